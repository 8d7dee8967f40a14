"""The data layer's import graph, read from the source with ast (late imports inside functions
included): acyclic, and no dataset reader imports the registry or what imports it."""

import ast
import pathlib

DATA = pathlib.Path(__file__).resolve().parents[2] / "ssr_jax" / "data"
READERS = ("voc", "coco", "synthetic", "folder")


def imports_of(path: pathlib.Path) -> set[str]:
  """Modules of ssr_jax.data that a file imports anywhere (top level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "ssr_jax.data":
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssr_jax.data."):
      out.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("ssr_jax.data.")}
  return out


def graph() -> dict[str, set[str]]:
  mods = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
  return {m: imports_of(DATA / f"{m}.py") & mods for m in mods}


def reachable(g, start) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for n in g[todo.pop()]:
      if n not in seen:
        seen.add(n)
        todo.append(n)
  return seen


def test_parser_sees_late_imports():
  g = graph()
  assert "pipeline_tf" in g["pipeline"]  # Imported inside a function (TensorFlow is late).
  assert {"registry", "records", "superpixels"} <= g["sources"]


def test_data_layer_imports_are_acyclic():
  g = graph()
  cycles = sorted(m for m in g if m in reachable(g, m))
  assert not cycles, f"import cycles through {cycles}: {g}"


def test_readers_never_import_the_registry_back():
  g = graph()
  assert set(READERS) <= g["registry"]
  for r in READERS:
    assert not reachable(g, r) & {"registry", "sources", "records", "superpixels"}, r
