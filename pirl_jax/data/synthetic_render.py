"""The renderer of the embedded synthetic dermoscopy set: one image from its random generator.

Three lesion classes, drawn from the cues dermatologists use, under heavy nuisance variation:

* nevus: symmetric round/oval shape, smooth regular border, radially symmetric colour zones,
  regular pigment network, regular globules;
* melanoma: asymmetric shape with irregular, notched border of varying sharpness, colours in
  irregular eccentric blotches (variegation), an atypical (warped, patchy) network, irregular
  dots/globules clustered at the periphery, radial streaks crossing the border;

  nevi and melanomas are two ends of one continuum of irregularity, whose per-class distributions
  overlap (some nevi look atypical, some melanomas banal), so a small CNN separates them well but
  not perfectly and fewer labels are clearly worse;
* seborrheic keratosis: sharply demarcated "stuck-on" lesion, cerebriform fissures with waxy
  ridges, comedo-like openings (dark crypts), milia-like cysts (small round bright dots).

Colour is deliberately *not* a class cue: every image draws its skin tone, its lesion browns, a
dark colour, an accent colour (blue-grey, pink-red or milky white) and the area fraction each
colour covers from one class-independent distribution. The class only decides where those colours
go (shape, symmetry, texture, structures), so a classifier on global colour histograms stays near
chance while a CNN can learn the classes.

Every image is rendered from ``np.random.default_rng([seed, SPLIT_IDS[split], index])``, so the
output is byte-identical for a given seed (and PIL/libjpeg build) and independent of the order or
process that renders it. `synthetic` writes the images as a dataset in the ISIC 2017 layout.
"""

from __future__ import annotations

import io
import math
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump whenever the rendered bytes change: it names the cache folder.
GENERATOR_VERSION = 1

MELANOMA, SEBORRHEIC_KERATOSIS, NEVUS = 0, 1, 2  # same codes as isic.IsicSplit.label
CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")

# split -> id used in the per-image RNG key; also fixes the image-id order.
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "unlabeled": 3}

_SIDE_RANGE = (160, 400)
_ASPECT_RANGE = (3 / 4, 4 / 3)
_JPEG_QUALITY_RANGE = (75, 95)


# ----------------------------------------------------------------------------
# Small vectorised drawing helpers. Coordinates are float32 arrays.
# ----------------------------------------------------------------------------


def _smoothstep(edge0, edge1, x):
  """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order)."""
  t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _noise(rng, shape, feature_px, octaves=3):
  """Smooth fractal noise of shape (H, W), features ~``feature_px`` wide, zero mean, unit std.

  Noise is isotropic, so it is drawn in pixel coordinates even where it
  textures a rotated lesion: each octave is a coarse random lattice upsampled
  bicubically with PIL. The octaves are summed on a grid only fine enough for
  the finest octave, then upsampled once, which is several times cheaper than
  summing at full resolution.
  """
  h, w = shape
  factor = max(1.0, feature_px / 2.0 ** (octaves - 1) / 4.0)
  sh, sw = max(2, round(h / factor)), max(2, round(w / factor))
  out = np.zeros((sh, sw), np.float32)
  amp = 1.0
  for octave in range(octaves):
    cell = max(feature_px / 2.0**octave / factor, 1.5)
    lattice = rng.standard_normal((int(sh / cell) + 2, int(sw / cell) + 2), dtype=np.float32)
    out += np.float32(amp) * np.asarray(
        Image.fromarray(lattice).resize((sw, sh), Image.Resampling.BICUBIC)
    )
    amp *= 0.5
  if (sh, sw) != (h, w):
    out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BILINEAR))
  out = out - out.mean()
  return out / max(float(out.std()), 1e-6)


_THETA_BINS = 2048
_THETA_GRID = np.linspace(-np.pi, np.pi, _THETA_BINS, endpoint=False)


def _theta_bin(theta):
  """Nearest ``_THETA_GRID`` index of each angle in [-pi, pi]."""
  return np.rint((theta + np.pi) * (_THETA_BINS / (2 * np.pi))).astype(np.int32) % _THETA_BINS


def _on_angles(g, values_on_grid):
  """A periodic function sampled on ``_THETA_GRID``, looked up at each pixel's angle.

  A table lookup is far cheaper than evaluating many harmonics at every pixel.
  """
  return np.asarray(values_on_grid, np.float32)[g.theta_bin]


def _angle_diff(a, b):
  """Signed angle a - b wrapped to [-pi, pi)."""
  return (a - b + np.pi) % (2 * np.pi) - np.pi


def _harmonics(rng, g, amplitudes):
  """Sum_k a_k cos(k theta + phi_k) with random phases; ``amplitudes[k-1]`` = a_k."""
  phases = rng.uniform(0, 2 * np.pi, len(amplitudes))
  k = np.arange(1, len(amplitudes) + 1)
  table = np.cos(k * _THETA_GRID[:, None] + phases) @ np.asarray(amplitudes, np.float64)
  return _on_angles(g, table)


def _hex_field(u, v, spacing, angle):
  """Sum of three plane waves at 120 degrees: maxima 3 on a triangular lattice."""
  k = 4 * math.pi / (math.sqrt(3) * spacing)
  directions = [angle + j * 2 * math.pi / 3 for j in range(3)]
  return sum(np.cos(k * (u * math.cos(a) + v * math.sin(a))) for a in directions)


def _fraction_mask(field, inside, fraction, soft):
  """Soft mask of where ``field`` is in its top ``fraction`` over ``inside`` pixels."""
  if fraction <= 0 or not inside.any():
    return np.zeros_like(field)
  thr = float(np.quantile(field[inside], 1.0 - fraction))
  return _smoothstep(thr - soft, thr + soft, field)


def _stamp_ellipses(canvas, xs, ys, rxs, rys, angles, softness=1.0):
  """Max-composites filled soft ellipses (pixel units) into ``canvas`` in place."""
  h, w = canvas.shape
  for x, y, rx, ry, a in zip(xs, ys, rxs, rys, angles):
    reach = max(rx, ry) + 2 * softness + 1
    x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, w)
    y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, h)
    if x0 >= x1 or y0 >= y1:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - x, yy - y
    c, s = math.cos(a), math.sin(a)
    # Normalised elliptic radius, turned into an approximate pixel distance.
    e = np.sqrt(((c * dx + s * dy) / rx) ** 2 + ((-s * dx + c * dy) / ry) ** 2)
    alpha = np.clip((1.0 - e) * min(rx, ry) / softness + 0.5, 0.0, 1.0)
    np.maximum(canvas[y0:y1, x0:x1], alpha, out=canvas[y0:y1, x0:x1])


def _count_for_fraction(fraction, radii_mean_sq):
  """Number of dots with this mean squared radius covering ``fraction`` of the lesion (area pi)."""
  return int(round(fraction / radii_mean_sq))


# ----------------------------------------------------------------------------
# Lesion rendering
# ----------------------------------------------------------------------------


class _Palette(NamedTuple):
  skin: np.ndarray
  base: np.ndarray
  secondary: np.ndarray
  dark: np.ndarray
  accent: np.ndarray
  f_secondary: float
  f_dark: float
  f_accent: float


def _draw_palette(rng) -> _Palette:
  """Class-independent colours and colour area fractions of one image."""
  tone = rng.uniform(0.45, 0.95)
  skin = tone * np.array([1.0, 0.79, 0.67]) * rng.uniform(0.93, 1.07, 3)
  # Melanin-like absorption: stronger in blue than in red, giving browns.
  absorb = np.array([0.75, 1.05, 1.4]) * rng.uniform(0.9, 1.1, 3)
  m = rng.uniform(0.35, 1.2)
  base = skin * np.exp(-m * absorb)
  secondary = skin * np.exp(-(m + rng.uniform(0.35, 0.9)) * absorb)
  dark = skin * np.exp(-(m + rng.uniform(1.2, 2.6)) * absorb)
  kind = rng.integers(3)
  if kind == 0:  # blue-grey
    accent = np.array([0.40, 0.47, 0.58]) * rng.uniform(0.7, 1.25) * rng.uniform(0.92, 1.08, 3)
  elif kind == 1:  # pink-red
    accent = np.array([0.82, 0.40, 0.42]) * rng.uniform(0.75, 1.15) * rng.uniform(0.92, 1.08, 3)
  else:  # milky white
    accent = np.array([0.93, 0.91, 0.89]) * rng.uniform(0.85, 1.05) * rng.uniform(0.96, 1.04, 3)
  f_accent = 0.0 if rng.random() < 0.25 else rng.uniform(0.04, 0.14)
  f32 = lambda c: np.clip(c, 0, 1).astype(np.float32)  # noqa: E731
  return _Palette(
      skin=f32(skin),
      base=f32(base),
      secondary=f32(secondary),
      dark=f32(dark),
      accent=f32(accent),
      f_secondary=rng.uniform(0.15, 0.4),
      f_dark=rng.uniform(0.04, 0.14),
      f_accent=f_accent,
  )


class _Layers(NamedTuple):
  alpha: np.ndarray  # lesion opacity over skin
  secondary: np.ndarray  # weight of the secondary brown
  accent: np.ndarray  # weight of the accent colour
  dark: np.ndarray  # weight of the dark colour
  shade: np.ndarray  # multiplicative lightness modulation (texture)


class _Geometry(NamedTuple):
  u: np.ndarray  # lesion coordinates (lesion radius = 1), rotated
  v: np.ndarray
  rho: np.ndarray
  theta: np.ndarray
  theta_bin: np.ndarray  # index into _THETA_GRID
  cx: float  # lesion centre in crop pixels
  cy: float
  radius: float  # lesion radius in pixels
  rotation: float

  @property
  def shape(self):
    return self.u.shape


def _to_pixels(g: _Geometry, u, v):
  """Lesion coordinates -> crop pixel coordinates."""
  c, s = np.cos(g.rotation), np.sin(g.rotation)
  return g.cx + g.radius * (c * u - s * v), g.cy + g.radius * (s * u + c * v)


def _normalise_radius(r):
  """Scales a border function so the enclosed area is pi (lesion radius 1)."""
  return r / np.sqrt(np.mean(r * r))


def _border_alpha(g, r_theta, width):
  """Lesion opacity from the border radius r(theta) and edge width (lesion units)."""
  return _smoothstep(-width, width, r_theta - g.rho)


def _radial_border(rng, g, amplitudes, notches=()):
  """Border radius r(theta) at each pixel: harmonics plus Gaussian notches, area pi."""
  phases = rng.uniform(0, 2 * np.pi, len(amplitudes))
  k = np.arange(1, len(amplitudes) + 1)
  r = 1.0 + np.cos(k * _THETA_GRID[:, None] + phases) @ np.asarray(amplitudes, np.float64)
  for depth, width in notches:
    d = _angle_diff(_THETA_GRID, rng.uniform(0, 2 * np.pi))
    r = r - depth * np.exp(-((d / width) ** 2))
  return _on_angles(g, _normalise_radius(r))


def _zscore(field, inside):
  """Standardises ``field`` over the lesion pixels so fields can be mixed."""
  vals = field[inside] if inside.any() else field
  return (field - vals.mean()) / max(float(vals.std()), 1e-6)


def _melanocytic(rng, g: _Geometry, pal: _Palette, s: float) -> _Layers:
  """Nevus-to-melanoma continuum, driven by the irregularity ``s`` in [0, 1].

  At s = 0: symmetric oval, smooth border, radially symmetric colour zones,
  regular network and lattice globules, concentric accent. As s grows: odd
  harmonics and notches (asymmetry, irregular border), edge sharpness varying
  along the border, colours in eccentric blotches, warped patchy network,
  globules jittered in size and place and clustered in one sector, and
  (likely only at high s) streaks crossing the border. Nevi and melanomas
  differ only in the distribution of s, which overlap (see ``_IRREGULARITY``).
  """
  amps = [s * rng.uniform(0.03, 0.14), rng.uniform(0.0, 0.14), s * rng.uniform(0.03, 0.12)]
  amps += [s * rng.uniform(0.0, 0.05) / math.sqrt(k - 2) for k in range(4, 13)]
  notches = [
      (rng.uniform(0.12, 0.28), rng.uniform(0.08, 0.22)) for _ in range(rng.binomial(3, s * s))
  ]
  r = _radial_border(rng, g, amps, notches)
  edge = rng.uniform(0.03, 0.09) + s * 0.08 * (
      _smoothstep(-1.0, 1.0, _harmonics(rng, g, [0.8, 0.6, 0.4])) - 0.5
  )
  alpha = _border_alpha(g, r, np.maximum(edge, 0.01))
  inside = alpha > 0.5
  q = g.rho / r

  def blotches():
    """Noise biased towards one side: eccentric colour blotches."""
    gamma = rng.uniform(0, 2 * np.pi)
    field = _noise(rng, g.shape, g.radius / rng.uniform(1.2, 2.0)) + rng.uniform(0.5, 1.5) * (
        g.u * math.cos(gamma) + g.v * math.sin(gamma)
    )
    return _zscore(field, inside)

  def radial(centre_dark=True):
    """Normalised radius about a centre pushed off-centre as s grows."""
    shift, phi = s * rng.uniform(0.0, 0.3), rng.uniform(0, 2 * np.pi)
    qq = np.hypot(g.u - shift * math.cos(phi), g.v - shift * math.sin(phi)) / r
    return _zscore(-qq if centre_dark else qq, inside)

  secondary = _fraction_mask(
      (1 - s) * radial(rng.random() < 0.6) + s * blotches(), inside, pal.f_secondary * 0.8, 0.1
  )
  if rng.random() < 0.75:  # pigment network: regular -> warped, thick/thin, patchy
    warp = 0.03 + 0.12 * s
    wu = g.u + warp * _noise(rng, g.shape, g.radius / 2.0, 2)
    wv = g.v + warp * _noise(rng, g.shape, g.radius / 2.0, 2)
    hexf = _hex_field(wu, wv, rng.uniform(0.17, 0.28), rng.uniform(0, np.pi))
    thick = 0.6 * s * _noise(rng, g.shape, g.radius / 1.5, 2)
    patches = _smoothstep(-0.2 - 2.0 * (1 - s), 0.4, _noise(rng, g.shape, g.radius / 1.2, 2))
    lines = _smoothstep(0.2 + thick, -0.6 + thick, hexf) * patches
    fade = _smoothstep(1.0 + 0.05 * s, 0.55 + 0.25 * s, q)
    secondary = np.maximum(secondary, rng.uniform(0.5, 1.0) * lines * fade)

  # Dark colour: a homogeneous area (centred -> eccentric blotch) ...
  dark = _fraction_mask(
      (1 - s) * radial() + s * blotches(), inside, pal.f_dark * rng.uniform(0.3, 0.6), 0.06
  )
  # ... plus globules: a regular lattice, jittered and clustered as s grows.
  if rng.random() < 0.6:
    spacing = rng.uniform(0.22, 0.34)
    angle = rng.uniform(0, np.pi)
    i, j = np.mgrid[-5:6, -5:6].reshape(2, -1)
    a, b = spacing * (i + 0.5 * j), spacing * math.sqrt(3) / 2 * j  # triangular lattice
    du = a * math.cos(angle) - b * math.sin(angle)
    dv = a * math.sin(angle) + b * math.cos(angle)
    du = du + s * 0.4 * spacing * rng.standard_normal(du.shape)
    dv = dv + s * 0.4 * spacing * rng.standard_normal(dv.shape)
    sector = rng.uniform(0, 2 * np.pi)
    near = np.cos(np.arctan2(dv, du) - sector) > 0.2
    keep = (np.hypot(du, dv) < 0.8) & (rng.random(du.shape) < np.where(near, 1.0, 1.0 - 0.9 * s))
    sizes = np.exp(s * 0.5 * rng.standard_normal(du.shape))
    # Mean globule radius so that the kept globules cover the intended fraction.
    target = pal.f_dark * rng.uniform(0.3, 0.5) * np.pi
    r0 = math.sqrt(target / (np.pi * max(float(np.sum(sizes[keep] ** 2)), 1.0)))
    x, y = _to_pixels(g, du[keep], dv[keep])
    rad = np.minimum(r0, 0.1) * sizes[keep] * g.radius
    globules = np.zeros_like(q)
    _stamp_ellipses(
        globules,
        x,
        y,
        rad,
        rad * (1 - s * rng.uniform(0, 0.4, rad.shape)),
        rng.uniform(0, np.pi, rad.shape),
    )
    dark = np.maximum(dark, globules)

  # Streaks / pseudopods: radial lines crossing the border in one sector.
  if rng.random() < 0.85 * s * s:
    centre = rng.uniform(0, 2 * np.pi)
    half_width = rng.uniform(0.5, 1.3)
    d = _angle_diff(g.theta, np.float32(centre))
    sector_w = _smoothstep(half_width, half_width * 0.6, np.abs(d))
    rays = _smoothstep(
        0.55, 0.9, np.cos(int(rng.integers(24, 48)) * g.theta + rng.uniform(0, 2 * np.pi))
    )
    extent = _smoothstep(0.7, 0.85, q) * _smoothstep(rng.uniform(1.1, 1.25), 1.0, q)
    streaks = sector_w * rays * extent
    dark = np.maximum(dark, streaks)
    alpha = np.maximum(alpha, streaks)

  # Accent: concentric ring or centred area -> eccentric veil.
  ring = _zscore(-np.abs(q - rng.choice([0.0, rng.uniform(0.35, 0.6)])), inside)
  accent = _fraction_mask((1 - s) * ring + s * blotches(), inside, pal.f_accent, 0.12)
  return _Layers(alpha, secondary, accent, dark, np.ones_like(q))


def _nevus(rng, g: _Geometry, pal: _Palette) -> _Layers:
  """Nevus: the melanocytic continuum with mostly low irregularity."""
  return _melanocytic(rng, g, pal, float(rng.beta(*_IRREGULARITY[NEVUS])))


def _melanoma(rng, g: _Geometry, pal: _Palette) -> _Layers:
  """Melanoma: the melanocytic continuum with mostly high irregularity."""
  return _melanocytic(rng, g, pal, float(rng.beta(*_IRREGULARITY[MELANOMA])))


def _seborrheic_keratosis(rng, g: _Geometry, pal: _Palette) -> _Layers:
  """Sharp, lobulated border; cerebriform fissures; dark crypts; milia-like cysts."""
  amps = [0.0, rng.uniform(0.0, 0.18)] + [rng.uniform(0.0, 0.05) for _ in range(4)]
  amps += [0.0] * 6 + [rng.uniform(0.0, 0.012) for _ in range(6)]  # fine "moth-eaten" edge
  r = _radial_border(rng, g, amps)
  alpha = _border_alpha(g, r, rng.uniform(0.006, 0.02))  # sharply demarcated
  inside = alpha > 0.5
  q = g.rho / r

  # Cerebriform pattern: curved fissures (level sets of a noise field) and waxy ridges.
  folds = _noise(rng, g.shape, g.radius / rng.uniform(0.9, 1.4), 2)
  wave = np.sin(np.pi * rng.uniform(2.5, 4.0) * folds)
  secondary = _fraction_mask(-np.abs(wave), inside, pal.f_secondary, 0.06)
  shade = 1.0 + rng.uniform(0.05, 0.12) * np.abs(wave)

  # Comedo-like openings: irregular dark crypts scattered over the lesion.
  dark = np.zeros_like(q)
  radii = rng.uniform(0.035, 0.075, 80)
  n = min(_count_for_fraction(pal.f_dark, np.mean(radii**2) * 1.5), 80)
  rad, ang = 0.85 * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
  x, y = _to_pixels(g, rad * np.cos(ang), rad * np.sin(ang))
  radii = radii[:n] * g.radius
  _stamp_ellipses(dark, x, y, radii * rng.uniform(1.2, 2.0, n), radii, rng.uniform(0, np.pi, n))

  # Milia-like cysts: small round sharp dots in the accent colour.
  accent = np.zeros_like(q)
  if pal.f_accent > 0:
    radii = rng.uniform(0.03, 0.06, 80)
    n = min(_count_for_fraction(pal.f_accent, np.mean(radii**2)), 80)
    rad, ang = 0.88 * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    x, y = _to_pixels(g, rad * np.cos(ang), rad * np.sin(ang))
    radii = radii[:n] * g.radius
    _stamp_ellipses(accent, x, y, radii, radii, np.zeros(n), softness=0.7)
  return _Layers(alpha, secondary, accent, dark, shade)


# Beta(a, b) of the irregularity s of nevi and melanomas. They overlap on
# purpose: some nevi look atypical and some melanomas banal, so labels matter
# and the task is not trivially separable.
_IRREGULARITY = {NEVUS: (1.5, 5.0), MELANOMA: (5.0, 2.0)}

_CLASS_RENDERERS: dict[int, Callable[..., _Layers]] = {
    MELANOMA: _melanoma,
    SEBORRHEIC_KERATOSIS: _seborrheic_keratosis,
    NEVUS: _nevus,
}


def _hair_mask(rng, height, width) -> np.ndarray:
  """Opacity of 0..25 curved hair strands (PIL polylines), float32 (H, W)."""
  if rng.random() < 0.45:
    return np.zeros((height, width), np.float32)
  mask = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(mask)
  side = min(height, width)
  t = np.linspace(0, 1, 16)[:, None]
  for _ in range(rng.integers(1, 26)):
    p0 = rng.uniform([0, 0], [width, height])
    ang = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 1.2) * side
    p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.2 * length, 2)
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    thickness = max(1, int(round(rng.uniform(0.6, 1.8) * side / 200)))
    draw.line(
        [tuple(p) for p in pts], fill=int(rng.uniform(150, 255)), width=thickness, joint="curve"
    )
  return np.asarray(mask.filter(ImageFilter.GaussianBlur(0.6)), np.float32) / 255.0


def render_image(rng: np.random.Generator, label: int) -> np.ndarray:
  """Renders one synthetic dermoscopy image.

  Args:
    rng: the image's random generator (all randomness is drawn from it).
    label: 0 melanoma, 1 seborrheic keratosis, 2 nevus.

  Returns:
    uint8 array (H, W, 3) with sides in [160, 400] and aspect in [3:4, 4:3].
  """
  width = int(rng.integers(_SIDE_RANGE[0], _SIDE_RANGE[1] + 1))
  aspect = np.exp(rng.uniform(np.log(_ASPECT_RANGE[0]), np.log(_ASPECT_RANGE[1])))
  height = int(np.clip(round(width * aspect), *_SIDE_RANGE))
  side = min(height, width)
  pal = _draw_palette(rng)

  # Skin with low-frequency mottling.
  xn = ((np.arange(width, dtype=np.float32) - width / 2) / side)[None, :]
  yn = ((np.arange(height, dtype=np.float32) - height / 2) / side)[:, None]
  mottle = 1.0 + 0.04 * _noise(rng, (height, width), side / 2.0, 3)
  image = pal.skin.astype(np.float32)[None, None, :] * mottle[..., None]

  # Lesion, rendered in a crop around it.
  radius = rng.uniform(0.17, 0.36) * side
  cx = width / 2 + rng.uniform(-0.12, 0.12) * side
  cy = height / 2 + rng.uniform(-0.12, 0.12) * side
  rotation = rng.uniform(0, 2 * np.pi)
  reach = 1.7 * radius
  x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
  y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
  dx = (np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)) / np.float32(radius)
  dy = (np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)) / np.float32(radius)
  c, s = np.float32(np.cos(rotation)), np.float32(np.sin(rotation))
  u, v = c * dx + s * dy, -s * dx + c * dy
  theta = np.arctan2(v, u)
  geom = _Geometry(
      u=u,
      v=v,
      rho=np.sqrt(u * u + v * v),
      theta=theta,
      theta_bin=_theta_bin(theta),
      cx=cx - x0,
      cy=cy - y0,
      radius=radius,
      rotation=rotation,
  )
  layers = _CLASS_RENDERERS[int(label)](rng, geom, pal)

  lesion = np.broadcast_to(pal.base.astype(np.float32), u.shape + (3,))
  for weight, colour in (
      (layers.secondary, pal.secondary),
      (layers.accent, pal.accent),
      (layers.dark, pal.dark),
  ):
    lesion = lesion + weight[..., None] * (colour.astype(np.float32) - lesion)
  grain = 1.0 + 0.05 * _noise(rng, u.shape, radius / 6.0, 2)
  lesion = lesion * (layers.shade * grain)[..., None]
  crop = image[y0:y1, x0:x1]
  image[y0:y1, x0:x1] = crop + layers.alpha[..., None] * (lesion - crop)

  # Hair strands.
  hair = _hair_mask(rng, height, width)
  if hair.any():
    hair_colour = pal.skin * rng.uniform(0.05, 0.3) if rng.random() < 0.85 else pal.skin * 1.1
    hair = hair[..., None] * np.float32(rng.uniform(0.6, 0.95))
    image = image + hair * (hair_colour.astype(np.float32) - image)

  # Illumination gradient and dermoscope vignetting.
  beta = rng.uniform(0, 2 * np.pi)
  light = 1.0 + rng.uniform(0.0, 0.35) * (xn * math.cos(beta) + yn * math.sin(beta))
  if rng.random() < 0.55:
    half_diag = math.hypot(height, width) / 2 / side
    rv = rng.uniform(0.72, 1.05) * half_diag
    rr = np.hypot(xn - rng.uniform(-0.05, 0.05), yn - rng.uniform(-0.05, 0.05))
    light = light * (1.0 - rng.uniform(0.0, 0.3) * (rr / rv) ** 2)
    light = light * (rng.uniform(0.02, 0.08) + _smoothstep(rv, rv - 0.02, rr))

  # Global colour jitter (same distribution for every class), folded with the
  # lighting into one affine colour map: per-channel gain (brightness, white
  # balance), saturation about the grey axis, contrast about the mean.
  gain = rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3)
  sat = rng.uniform(0.7, 1.3)
  contrast = rng.uniform(0.85, 1.15)
  colour_map = np.diag(gain) @ (sat * np.eye(3) + (1 - sat) / 3 * np.ones((3, 3)))
  mean = float((np.einsum("hw,hwc->c", light, image) / light.size @ colour_map).mean())
  image = image @ (contrast * colour_map).astype(np.float32)
  image *= light[..., None]
  image += np.float32((1 - contrast) * mean)
  image += np.float32(rng.uniform(0.004, 0.03)) * rng.standard_normal(image.shape, np.float32)
  image *= 255
  image += 0.5
  np.clip(image, 0, 255, out=image)
  out = Image.fromarray(image.astype(np.uint8))
  if rng.random() < 0.5:
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4)))
  return np.asarray(out)


def render_jpeg(seed: int, split: str, index: int, label: int) -> bytes:
  """JPEG bytes of image ``index`` of ``split`` (deterministic in its arguments)."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  pixels = render_image(rng, label)
  quality = int(rng.integers(_JPEG_QUALITY_RANGE[0], _JPEG_QUALITY_RANGE[1] + 1))
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
