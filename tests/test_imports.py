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
        return stack[stack.index(target):] + [target]
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
  assert "pirl_jax.train.pretrain" in graph["pirl_jax.cli"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
  assert _cycle(_module_graph()) is None


def test_imports_point_from_the_commands_down_to_the_data_and_models():
  graph = _module_graph()
  entry_points = {"pirl_jax.cli", "pirl_jax.program"}
  for name, targets in graph.items():
    if name not in entry_points:
      assert "pirl_jax.cli" not in targets, f"{name} imports the command line"
  lower = [n for n in graph if n.startswith(("pirl_jax.data", "pirl_jax.models"))]
  upper = ("pirl_jax.train", "pirl_jax.eval", "pirl_jax.analysis", "pirl_jax.cli",
           "pirl_jax.program")
  for name in lower + ["pirl_jax.train.loop", "pirl_jax.signals", "pirl_jax.losses",
                       "pirl_jax.memory_bank"]:
    wrong = sorted(t for t in graph[name] if t.startswith(upper) and t != "pirl_jax.train.loop")
    assert not wrong, f"{name} imports {wrong}, which sit above it"
