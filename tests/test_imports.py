"""The package's imports, those inside functions included, form no circle and point one way."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pirl_jax"


def _module_graph() -> dict[str, set[str]]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          targets.add(full if full in modules else node.module)
    graph[name] = {t for t in targets if t in modules and t != name}
  return graph


def _cycle(graph):
  """One import circle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return stack[stack.index(target) :] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_imports_inside_functions():
  graph = _module_graph()
  # cli imports the pretraining task only inside `_train`.
  assert "pirl_jax.tasks.pretrain" in graph["pirl_jax.commands.cli"]
  assert _layer("pirl_jax.tasks.pretrain") > _layer("pirl_jax.train.loop")
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
  assert _cycle(_module_graph()) is None


# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = (
    ("user_errors", "storage", "sharding", "signals", "methods", "distributed", "config_blocks"),
    ("data", "models", "losses", "memory_bank", "key_queue"),
    ("checkpointing", "configuration", "preflight", "trunk_init", "inference"),
    ("train",),
    ("eval",),
    ("tasks",),
    ("commands",),
)


def _layer(module: str) -> int:
  if module == "pirl_jax":
    return 0
  top = module.split(".")[1]
  for rank, names in enumerate(LAYERS):
    if top in names:
      return rank
  raise AssertionError(f"{module} is in no layer of LAYERS: place it")


def test_every_module_has_a_layer():
  for name in _module_graph():
    _layer(name)
  assert (
      _layer("pirl_jax.data.jigsaw")
      < _layer("pirl_jax.train.loop")
      < _layer("pirl_jax.eval.probe")
      < _layer("pirl_jax.tasks.pretrain")
      < _layer("pirl_jax.commands.cli")
  )


def test_imports_point_from_the_commands_down_to_the_data_and_models():
  for name, targets in _module_graph().items():
    upward = sorted(t for t in targets if _layer(t) > _layer(name))
    assert not upward, f"{name} imports {upward}, which sit above it"
