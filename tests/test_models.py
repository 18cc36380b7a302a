"""ResNet trunk and PIRL network: parameter counts, init, BatchNorm modes, two-pass semantics, heads."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pirl_jax.models import pirl, resnet

IMAGE = 32
TILE = 16
BATCH = 2
EMBED = 16


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size=224):
  return jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False), jax.random.key(0)
  )


@pytest.mark.parametrize(
    'ctor,expected',
    [
        (resnet.ResNet50, 25_557_032),
        (resnet.ResNet18, 11_689_512),
        (resnet.ResNet34, 21_797_672),
        (resnet.ResNet101, 44_549_160),
    ],
)
def test_param_count_matches_torchvision(ctor, expected):
  variables = _abstract_init(ctor(num_classes=1000))
  assert _count(variables['params']) == expected


def test_abstract_shapes_and_dtypes():
  r50 = resnet.get_trunk('resnet50', dtype=jnp.bfloat16)
  out = jax.eval_shape(
      lambda k: r50.init_with_output(k, jnp.zeros((3, 224, 224, 3)), train=False), jax.random.key(0)
  )[0]
  assert out.shape == (3, 2048) and out.dtype == jnp.float32
  variables = _abstract_init(r50)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits = jax.eval_shape(
      lambda k: resnet.ResNet18(num_classes=7).init_with_output(
          k, jnp.zeros((2, 64, 64, 3)), train=False
      ),
      jax.random.key(0),
  )[0]
  assert logits.shape == (2, 7)


def test_feature_dim_and_factory():
  assert resnet.feature_dim('resnet50') == 2048
  assert resnet.feature_dim('ResNet18') == 512
  assert resnet.feature_dim('resnet50', 2) == 4096
  assert resnet.feature_dim('resnet_tiny') == 64
  assert resnet.feature_dim('resnet_tiny_bottleneck') == 256
  wide = _abstract_init(resnet.get_trunk('resnet_tiny', width_multiplier=2.0), size=32)
  assert wide['params']['conv_init']['kernel'].shape[-1] == 16
  with pytest.raises(ValueError, match='resnet50'):
    resnet.get_trunk('resnet51')


def test_small_input_stem_keeps_resolution():
  trunk = resnet.get_trunk('resnet_tiny', small_input=True)
  variables = _abstract_init(trunk, size=16)
  assert variables['params']['conv_init']['kernel'].shape == (3, 3, 3, 8)


def test_torch_linear_init_bounds():
  init = resnet.torch_linear_init(100)
  w = np.asarray(init(jax.random.key(0), (100, 50)))
  assert np.abs(w).max() <= 0.1 and np.abs(w).max() > 0.09


# --- real (tiny) networks -------------------------------------------------------------------------


def _rng(seed):
  # rbg keys compile far faster than threefry on CPU; the tests only need *some* randomness.
  return jax.random.key(seed, impl='rbg')


@pytest.fixture(scope='module')
def net():
  model = pirl.PIRLNet(trunk=resnet.get_trunk('resnet_tiny'), embed_dim=EMBED)
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.randn(BATCH, IMAGE, IMAGE, 3), jnp.float32)
  tiles = jnp.asarray(rs.randn(BATCH, 9, TILE, TILE, 3), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, images, tiles, train=False))(_rng(0))
  apply_train = jax.jit(lambda v, im, t: model.apply(v, im, t, train=True, mutable=['batch_stats']))
  apply_eval = jax.jit(lambda v, im, t: model.apply(v, im, t, train=False))
  return dict(
      model=model,
      images=images,
      tiles=tiles,
      variables=variables,
      apply_train=apply_train,
      apply_eval=apply_eval,
  )


def test_torchvision_style_init(net):
  params = net['variables']['params']
  trunk = params['trunk']
  assert trunk['conv_init']['kernel'].shape == (7, 7, 3, 8)
  # Conv: Kaiming normal, fan_out. The widest conv has enough weights for a loose std check.
  k = np.asarray(trunk['BasicBlock_3']['Conv_1']['kernel'])
  fan_out = k.shape[0] * k.shape[1] * k.shape[3]
  assert abs(k.std() / math.sqrt(2.0 / fan_out) - 1) < 0.05
  num_bn = 0
  for path, leaf in flax.traverse_util.flatten_dict(trunk).items():
    if path[-2].startswith(('bn', 'BatchNorm', 'norm')):
      num_bn += 1
      expected = 1.0 if path[-1] == 'scale' else 0.0
      np.testing.assert_array_equal(leaf, expected)
  assert num_bn == 2 * (1 + 4 * 2 + 3)  # stem, 2 per block, 3 projections; scale and bias each
  for name in ('f_out', 'g_tile_out', 'g_concat'):
    kernel, bias = params[name]['kernel'], params[name]['bias']
    bound = 1 / math.sqrt(kernel.shape[0])
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert np.abs(kernel).max() > 0.8 * bound


def test_pirl_shapes_and_unit_norm(net):
  (f, g), _ = net['apply_train'](net['variables'], net['images'], net['tiles'])
  assert f.shape == (BATCH, EMBED) and g.shape == (BATCH, EMBED)
  assert f.dtype == jnp.float32 and g.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(g, axis=-1), 1.0, rtol=1e-5)
  params = net['variables']['params']
  assert set(params) == {'trunk', 'f_out', 'g_tile_out', 'g_concat'}
  assert params['g_concat']['kernel'].shape == (9 * EMBED, EMBED)


def test_batchnorm_running_stats_only_change_in_train_mode(net):
  trunk = net['model'].trunk
  variables = {
      'params': net['variables']['params']['trunk'],
      'batch_stats': net['variables']['batch_stats']['trunk'],
  }
  run = jax.jit(lambda v, x: trunk.apply(v, x, train=True, mutable=['batch_stats']))
  _, new = run(variables, net['images'])
  changed = jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      variables['batch_stats'],
      new['batch_stats'],
  )
  assert all(jax.tree.leaves(changed))
  run_eval = jax.jit(lambda v, x: trunk.apply(v, x, train=False, mutable=['batch_stats']))
  _, same = run_eval(variables, net['images'])
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], same['batch_stats'])


def test_running_stats_threaded_tiles_then_images(net):
  variables = net['variables']
  _, new = net['apply_train'](variables, net['images'], net['tiles'])

  trunk = net['model'].trunk
  run = jax.jit(lambda v, x: trunk.apply(v, x, train=True, mutable=['batch_stats']))
  flat_tiles = net['tiles'].reshape((BATCH * 9, TILE, TILE, 3))
  stats = variables['batch_stats']['trunk']
  _, s1 = run({'params': variables['params']['trunk'], 'batch_stats': stats}, flat_tiles)
  _, s2 = run(
      {'params': variables['params']['trunk'], 'batch_stats': s1['batch_stats']}, net['images']
  )
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      new['batch_stats']['trunk'],
      s2['batch_stats'],
  )
  # The other order gives different statistics, so the check above is not vacuous.
  _, r1 = run({'params': variables['params']['trunk'], 'batch_stats': stats}, net['images'])
  _, r2 = run(
      {'params': variables['params']['trunk'], 'batch_stats': r1['batch_stats']}, flat_tiles
  )
  diffs = jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), new['batch_stats']['trunk'], r2['batch_stats']
  )
  assert max(jax.tree.leaves(diffs)) > 1e-4


def test_f_does_not_depend_on_tiles_in_train_mode(net):
  (f1, _), _ = net['apply_train'](net['variables'], net['images'], net['tiles'])
  other = jnp.asarray(np.random.RandomState(5).randn(*net['tiles'].shape), jnp.float32)
  (f2, g2), _ = net['apply_train'](net['variables'], net['images'], other * 3.0 + 1.0)
  np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
  f3, _ = net['apply_eval'](net['variables'], net['images'], other)
  f4, _ = net['apply_eval'](net['variables'], net['images'], net['tiles'])
  np.testing.assert_allclose(f3, f4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_g_concatenates_tiles_in_given_order(net, mode):
  def g_of(variables, tiles):
    if mode == 'train':
      return net['apply_train'](variables, net['images'], tiles)[0][1]
    return net['apply_eval'](variables, net['images'], tiles)[1]

  perm = np.array([3, 0, 8, 1, 5, 2, 7, 4, 6])
  tiles_p = net['tiles'][:, perm]
  g = g_of(net['variables'], net['tiles'])
  g_p = g_of(net['variables'], tiles_p)
  assert np.abs(np.asarray(g) - np.asarray(g_p)).max() > 1e-3
  # Permuting the concat layer's input blocks the same way undoes the permutation exactly:
  # g really is Linear(concat(tile embeddings in the given order)).
  variables = flax.core.unfreeze(jax.tree.map(lambda x: x, net['variables']))
  kernel = variables['params']['g_concat']['kernel'].reshape(9, EMBED, EMBED)
  variables['params']['g_concat']['kernel'] = kernel[perm].reshape(9 * EMBED, EMBED)
  np.testing.assert_allclose(g_of(variables, tiles_p), g, rtol=1e-4, atol=1e-5)


def test_trunk_features_method(net):
  feats = jax.jit(
      lambda v, x: net['model'].apply(v, x, train=False, method=pirl.PIRLNet.trunk_features)
  )(net['variables'], net['images'])
  assert feats.shape == (BATCH, 64)


def test_mlp_head_and_validation():
  model = pirl.PIRLNet(trunk=resnet.get_trunk('resnet_tiny'), embed_dim=EMBED, head='mlp')
  images = jnp.zeros((BATCH, IMAGE, IMAGE, 3))
  tiles = jnp.zeros((BATCH, 9, TILE, TILE, 3))
  variables = jax.eval_shape(lambda k: model.init(k, images, tiles, train=False), jax.random.key(0))
  shapes = jax.tree.map(lambda x: x.shape, variables['params'])
  assert shapes['f_hidden']['kernel'] == (64, 64)
  assert shapes['f_out']['kernel'] == (64, EMBED)
  assert shapes['g_tile_hidden']['kernel'] == (64, 64)
  assert shapes['g_concat']['kernel'] == (9 * EMBED, EMBED)
  with pytest.raises(ValueError, match='tiles'):
    jax.eval_shape(lambda k: model.init(k, images, tiles[:, :8], train=False), jax.random.key(0))
  bad = pirl.PIRLNet(trunk=resnet.get_trunk('resnet_tiny'), head='conv')
  with pytest.raises(ValueError, match='head'):
    jax.eval_shape(lambda k: bad.init(k, images, tiles, train=False), jax.random.key(0))
