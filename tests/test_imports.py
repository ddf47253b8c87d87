"""The import graph: no circles among moejax's modules (in-function imports count: they only hide a circle),
and the core never reaches up into a training method (methods plug in through moejax/methods.py's table)."""

import ast
import pathlib

import moejax

ROOT = pathlib.Path(moejax.__file__).parent
CORE = ("moejax.train", "moejax.step", "moejax.models", "moejax.layers", "moejax.checkpoint")
METHOD_PACKAGES = ("moejax.peft", "moejax.ttmm", "moejax.prune")
# Being taken apart by the run-writing work (moejax/runs.py: one destination check, one params-only writer);
# delete this entry with it.
KNOWN_CYCLES: list[set[str]] = []  # none left


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for f in ROOT.rglob("*.py"):
    parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return out


def _type_checking(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return isinstance(node, ast.If) and (
    (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or
    (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST):
  """Every node of `tree` except those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
  todo = [tree]
  while todo:
    node = todo.pop()
    yield node
    todo.extend(c for c in ast.iter_child_nodes(node) if not _type_checking(c))


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
  """Every moejax module `name` imports, anywhere in the file (`from a import b` counts a.b when that is a
  module, else a)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
  out = set()
  for dep in found:
    while dep and dep not in modules:  # a symbol or a submodule we do not index: its nearest module
      dep = dep.rpartition(".")[0]
    if dep.startswith("moejax") and dep != name:
      out.add(dep)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
  index, low, on, stack, out = {}, {}, set(), [], []
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on.add(root)
    while work:
      v, it = work[-1]
      w = next(it, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = len(index)
          stack.append(w)
          on.add(w)
          work.append((w, iter(sorted(graph[w]))))
        elif w in on:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        comp = set()
        while True:
          w = stack.pop()
          on.discard(w)
          comp.add(w)
          if w == v:
            break
        if len(comp) > 1:
          out.append(comp)
  return out


def test_the_graph_sees_in_function_imports_and_skips_type_only_ones():
  g = _graph()
  assert "moejax.config" not in g["moejax.layers.router"]  # `if TYPE_CHECKING:` only (annotations)
  assert "moejax.upcycle" in g["moejax.train"]  # imported inside `initial_params` only
  assert "moejax.ttmm.cli" in g["moejax.cli"]


def test_no_import_cycles():
  cycles = [c for c in _cycles(_graph()) if c not in KNOWN_CYCLES]
  assert not cycles, f"import cycles (in-function imports included): {[sorted(c) for c in cycles]}"


def test_core_imports_no_training_method():
  bad = {}
  for m, deps in _graph().items():
    if any(m == c or m.startswith(c + ".") for c in CORE):
      up = sorted(d for d in deps if any(d == p or d.startswith(p + ".") for p in METHOD_PACKAGES))
      if up:
        bad[m] = up
  assert not bad, f"core modules importing a method package: {bad}"
