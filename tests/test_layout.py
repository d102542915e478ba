"""The package's layout (docs/style.md): every module has a level, imports point down and
take no private names, no import cycles, modules stay short, binaries are thin.

The checks are plain functions over what `read_modules` reads (each module's ddae_jax
imports, lazy ones included, and its length); the same functions run on ddae_jax/ and
launch/ and on the small planted packages at the end of this file, which show that each
check fails where it says it does.
"""

import ast
import collections
import pathlib
from typing import Iterable, NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "ddae_jax"
SCRIPTS = "launch"  # scripts, not a package: each may import any ddae_jax module
BINARIES = ("main", "finetune", "linear_probe", "knn", "convert", "analyze", "aot", "bench",
            "bench_input", "sweep")
# Highest first; a module may import its own level (within its room) and any lower one.
# Every module of ddae_jax is listed by name; a new module goes under its level here.
LEVELS = (
    ("scripts", ()),  # every launch/*.py; above the binaries
    ("binaries", tuple(f"ddae_jax.{b}" for b in BINARIES)),
    ("tools", ("ddae_jax.cli", "ddae_jax.perf.aot", "ddae_jax.perf.aot_evals",
               "ddae_jax.perf.bench", "ddae_jax.perf.bench_input",
               "ddae_jax.analysis.commands")),
    # Pretraining runs the evaluators of config.evals inside its loop.
    ("pretraining", ("ddae_jax.train",)),
    ("trainers", (
        "ddae_jax.analysis", "ddae_jax.analysis.attention", "ddae_jax.analysis.beta",
        "ddae_jax.analysis.distance", "ddae_jax.analysis.evals", "ddae_jax.analysis.plots",
        "ddae_jax.analysis.reconstruction",
        "ddae_jax.evaluation", "ddae_jax.evaluation.classifier", "ddae_jax.evaluation.config",
        "ddae_jax.evaluation.evaluators", "ddae_jax.evaluation.finetune",
        "ddae_jax.evaluation.input_pipeline", "ddae_jax.evaluation.knn",
        "ddae_jax.evaluation.linear_probe", "ddae_jax.evaluation.loop",
        "ddae_jax.evaluation.mixup", "ddae_jax.evaluation.randaugment",
        "ddae_jax.evaluation.readout", "ddae_jax.evaluation.scoring",
        "ddae_jax.weights.convert")),
    ("step", ("ddae_jax.train_step",)),
    ("methods", ("ddae_jax.methods", "ddae_jax.methods.base", "ddae_jax.methods.beitv2",
                 "ddae_jax.methods.ddae", "ddae_jax.methods.schedules")),
    ("training parts", ("ddae_jax.optim", "ddae_jax.runtime")),
    ("formats", ("ddae_jax.perf", "ddae_jax.perf.flops", "ddae_jax.weights",
                 "ddae_jax.weights.checkpoints", "ddae_jax.weights.pretrained",
                 "ddae_jax.weights.shapes", "ddae_jax.weights.state_dict",
                 "ddae_jax.weights.torch_vit", "ddae_jax.weights.vqkd")),
    ("configs", ("ddae_jax.config_lib", "ddae_jax.config_checks", "ddae_jax.ablations",
                 "ddae_jax.config_attention", "ddae_jax.config_evals")),
    ("loss math", ("ddae_jax.objectives", "ddae_jax.objectives.beitv2",
                   "ddae_jax.objectives.ddae", "ddae_jax.objectives.dynamic_weights",
                   "ddae_jax.objectives.masking")),
    ("foundations", ("ddae_jax", "ddae_jax.cluster", "ddae_jax.data", "ddae_jax.data.augment",
                     "ddae_jax.data.normalize", "ddae_jax.data.pipeline",
                     "ddae_jax.data.sources", "ddae_jax.metrics", "ddae_jax.models",
                     "ddae_jax.models.attention", "ddae_jax.models.decoder",
                     "ddae_jax.models.short_attention", "ddae_jax.models.tokenizer",
                     "ddae_jax.models.vit", "ddae_jax.sharding")),
)
# config_lib, config_checks, ablations, config_attention and config_evals are one config
# split in five (fields and checks, type and resume checks, the paper's rows, the attention
# choice, the evaluators inside pretraining): each may import the others.
SIDEWAYS = ("configs",)

MAX_LINES = 400
# Modules over MAX_LINES, each with the reason it is read as one piece.
OVERSIZED = {
    "ddae_jax.config_lib": "the pretraining config's ~200 lines of fields, each with the "
                           "comment that says where its default comes from, beside the "
                           "values derived from them (docs/decisions.md, issue 26)",
    "ddae_jax.perf.aot": "one TPU compile report (slice parsing, HLO collectives and byte "
                         "accounting, the report row) read as a whole",
}


class Import(NamedTuple):
  """A use of a ddae_jax module: `from m import name`, `import m` (name None) or `m.name`."""
  target: str
  name: str | None
  line: int
  attribute: bool = False


class Module(NamedTuple):
  path: pathlib.Path  # from the repository's root
  lines: int
  imports: list[Import]


# ------------------------------------------------------------- reading the modules
def module_names(root: pathlib.Path, package: str, scripts: str | None) -> dict[str, pathlib.Path]:
  """{dotted name: path} of the package's modules (packages by their __init__) and the
  scripts ("launch.tpu")."""
  names = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  for path in sorted((root / scripts).glob("*.py")) if scripts else ():
    names[f"{scripts}.{path.stem}"] = path
  return names


def _dotted(node: ast.AST) -> str | None:
  """"a.b.c" of a chain of names and attributes; None for anything else."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute) and (value := _dotted(node.value)):
    return f"{value}.{node.attr}"
  return None


def imports_of(tree: ast.AST, package: str, modules: Iterable[str]) -> list[Import]:
  """Every import of `package` in `tree`, lazy ones included, and every attribute taken of a
  module such an import binds (`aot.cost_analysis`, `ddae_jax.perf.aot.cost_analysis`)."""
  modules, found, bound = set(modules), [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == package or node.module.startswith(package + ".")):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        # `from ddae_jax.x import y`: y is a module when ddae_jax.x.y is one.
        target, name = (sub, None) if sub in modules else (node.module, alias.name)
        found.append(Import(target, name, node.lineno))
        bound[alias.asname or alias.name] = sub
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == package or alias.name.startswith(package + "."):
          found.append(Import(alias.name, None, node.lineno))
          bound[alias.asname or package] = alias.name if alias.asname else package
  for node in ast.walk(tree):
    value = _dotted(node.value) if isinstance(node, ast.Attribute) else None
    if value and value.split(".")[0] in bound:
      first, _, rest = value.partition(".")
      target = ".".join(filter(None, (bound[first], rest)))
      if target in modules:
        found.append(Import(target, node.attr, node.lineno, attribute=True))
  return found


def read_modules(root: pathlib.Path, package: str = PACKAGE,
                 scripts: str | None = SCRIPTS) -> dict[str, Module]:
  paths = module_names(root, package, scripts)
  out = {}
  for name, path in paths.items():
    text = path.read_text()
    out[name] = Module(path.relative_to(root), len(text.splitlines()),
                       imports_of(ast.parse(text), package, paths))
  return out


# ------------------------------------------------------------- the checks
def level_table(levels=LEVELS) -> dict[str, int]:
  """{module: its level's index}, highest level 0."""
  return {m: i for i, (_, members) in enumerate(levels) for m in members}


def listing_problems(modules: Iterable[str], levels=LEVELS, scripts: str = SCRIPTS) -> list[str]:
  """A module in no level, and a listed module that does not exist."""
  table, modules = level_table(levels), set(modules)
  where = "tests/test_layout.py's LEVELS"
  unlisted = [f"{m} is in no level: add it to {where} under the level it belongs to"
              for m in sorted(modules) if m not in table and not m.startswith(scripts + ".")]
  stale = [f"{where} lists {m}, which does not exist: remove it"
           for m in sorted(table) if m not in modules]
  return unlisted + stale


def _level(module: str, table: dict[str, int], scripts: str) -> int:
  if module.startswith(scripts + "."):
    return 0
  if module not in table:
    raise AssertionError(f"{module} is in no level of tests/test_layout.py's LEVELS")
  return table[module]


def _room(module: str) -> str:
  """A package of ddae_jax, or a top-level module: "ddae_jax.evaluation", "ddae_jax.train"."""
  return ".".join(module.split(".")[:2])


def _dunder(name: str) -> bool:
  return name.startswith("__") and name.endswith("__")


def import_problems(module: str, found: Module, levels=LEVELS, sideways=SIDEWAYS,
                    scripts: str = SCRIPTS) -> list[str]:
  """Imports of `module` that point up or sideways, or take another module's private name."""
  table, problems = level_table(levels), []
  mine = _level(module, table, scripts)
  for target, name, line, attribute in found.imports:
    where = f"{found.path}:{line} {'uses' if attribute else 'imports'} {target}"
    if attribute:  # `aot._cost`: a private name of an imported module
      if name.startswith("_") and not _dunder(name):
        problems.append(f"{where}.{name}: a private name")
      continue
    if name is not None and name.startswith("_"):
      problems.append(f"{where}.{name}: a private name")
    theirs = _level(target, table, scripts)
    beside = theirs == mine and (_room(target) == _room(module) or levels[mine][0] in sideways)
    if not (theirs > mine or beside):
      problems.append(f"{where}, which is {levels[theirs][0]!r}, above or beside "
                      f"{levels[mine][0]!r}")
  return problems


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
  parents, queue = {}, collections.deque([start])
  while queue:
    node = queue.popleft()
    for nxt in sorted(graph.get(node, ())):
      if nxt == start:
        path = [node]
        while path[-1] != start:
          path.append(parents[path[-1]])
        return path[::-1] + [start]
      if nxt not in parents:
        parents[nxt] = node
        queue.append(nxt)
  return None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Import cycles of {module: the modules it imports}, each as a path back to its start
  (["a", "b", "a"]): the shortest through each module not already in a reported one."""
  found, seen = [], set()
  for start in sorted(graph):
    if start not in seen and (cycle := _shortest_cycle(graph, start)):
      found.append(cycle)
      seen |= set(cycle)
  return found


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
  return {m: {i.target for i in found.imports if i.target != m}
          for m, found in modules.items()}


def size_problems(lines: dict[str, int], oversized: dict[str, str] = OVERSIZED,
                  limit: int = MAX_LINES) -> list[str]:
  """Modules over `limit` lines without a reason, and reasons recorded for modules under it."""
  problems = [f"{m} has {n} lines, over {limit}: split it, or record why it is read as one "
              f"piece in tests/test_layout.py's OVERSIZED" for m, n in sorted(lines.items())
              if n > limit and not oversized.get(m)]
  problems += [f"OVERSIZED lists {m}, which has {lines[m] if m in lines else 'no'} lines, "
               f"not over {limit}: remove it" for m in sorted(oversized)
               if lines.get(m, 0) <= limit]
  return problems


# ------------------------------------------------------------- the package
MODULES = read_modules(ROOT)


def test_every_module_has_a_level_and_every_binary_exists():
  problems = listing_problems(MODULES)
  assert not problems, "\n".join(problems)
  for b in BINARIES:
    assert f"ddae_jax.{b}" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_take_no_private_names(module):
  problems = import_problems(module, MODULES[module])
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  cycles = import_cycles(import_graph(MODULES))
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_stay_under_400_lines_or_say_why():
  problems = size_problems({m: found.lines for m, found in MODULES.items()})
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("binary", BINARIES)
def test_binaries_are_thin(binary):
  """A binary holds its docstring, its imports and a __main__ call; sweep.py is its own tool."""
  tree = ast.parse((ROOT / MODULES[f"ddae_jax.{binary}"].path).read_text())
  functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
  limit = 4 if binary == "sweep" else 1
  assert len(functions) <= limit, [f.name for f in functions]


def test_no_merge_conflict_markers():
  """A merge that kept both sides' markers (docs/style.md and docs/decisions.md once did)."""
  found = []
  for path in sorted(ROOT.glob("**/*")):
    if path.suffix not in {".py", ".md", ".sh", ".toml", ".cfg", ".txt"} or any(
        part.startswith(".") or part in {"peers", "build"} for part in path.relative_to(
            ROOT).parts):
      continue
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
        found.append(f"{path.relative_to(ROOT)}:{number}")
  assert not found, f"merge conflict markers: {found}"


# ------------------------------------------------------------- planted faults
# A package "pkg" of three levels (top: pkg.app; middle: pkg.lib, pkg.other; bottom:
# pkg.base) and a script, written to tmp_path and read by read_modules.
PLANTED_LEVELS = (("scripts", ()), ("top", ("pkg.app",)), ("middle", ("pkg.lib", "pkg.other")),
                  ("bottom", ("pkg", "pkg.base")))


def _planted(tmp_path, **files) -> dict[str, Module]:
  """read_modules of "pkg" with these modules ({"lib": source}) beside a fine pkg.base."""
  (tmp_path / "pkg").mkdir()
  (tmp_path / "scripts").mkdir()
  files = {"__init__": "", "base": "def _hidden():\n  pass\n", **files}
  for name, source in files.items():
    folder = "scripts" if name.startswith("script_") else "pkg"
    (tmp_path / folder / f"{name.removeprefix('script_')}.py").write_text(source)
  return read_modules(tmp_path, "pkg", "scripts")


def test_a_planted_two_module_cycle_is_reported_with_its_path(tmp_path):
  modules = _planted(tmp_path, lib="def f():\n  from pkg import other\n",
                     other="import pkg.lib\n", app="from pkg import lib\n")
  assert import_cycles(import_graph(modules)) == [["pkg.lib", "pkg.other", "pkg.lib"]]
  del modules["pkg.other"]
  assert import_cycles(import_graph(modules)) == []


def test_an_unlisted_module_and_a_stale_entry_are_named(tmp_path):
  modules = _planted(tmp_path, lib="", app="", extra="", script_run="import pkg.app\n")
  problems = listing_problems(modules, PLANTED_LEVELS, "scripts")
  assert problems == [
      "pkg.extra is in no level: add it to tests/test_layout.py's LEVELS under the level it "
      "belongs to",
      "tests/test_layout.py's LEVELS lists pkg.other, which does not exist: remove it"]
  with pytest.raises(AssertionError, match="pkg.extra is in no level"):
    import_problems("pkg.extra", modules["pkg.extra"], PLANTED_LEVELS, (), "scripts")


def test_an_oversized_module_without_a_reason_fails_and_a_stale_reason_too(tmp_path):
  modules = _planted(tmp_path, lib="x = 1\n" * 401, app="x = 1\n" * 400)
  lines = {m: found.lines for m, found in modules.items()}
  assert size_problems(lines, {}) == [
      "pkg.lib has 401 lines, over 400: split it, or record why it is read as one piece in "
      "tests/test_layout.py's OVERSIZED"]
  assert size_problems(lines, {"pkg.lib": "one table"}) == []
  assert size_problems(lines, {"pkg.lib": "one table", "pkg.app": "long"}) == [
      "OVERSIZED lists pkg.app, which has 400 lines, not over 400: remove it"]


def test_upward_imports_and_private_names_are_named_in_scripts_and_the_package(tmp_path):
  modules = _planted(
      tmp_path, app="", other="",
      lib="from pkg.base import _hidden\nfrom pkg import app, other\n",
      script_run="from pkg import base\nimport pkg.base as b\nbase._hidden()\nb._hidden()\n"
                 "print(base.__name__, app)\nfrom pkg import app\n")
  assert import_problems("pkg.lib", modules["pkg.lib"], PLANTED_LEVELS, (), "scripts") == [
      "pkg/lib.py:1 imports pkg.base._hidden: a private name",
      "pkg/lib.py:2 imports pkg.app, which is 'top', above or beside 'middle'",
      "pkg/lib.py:2 imports pkg.other, which is 'middle', above or beside 'middle'"]
  assert import_problems("pkg.lib", modules["pkg.lib"], PLANTED_LEVELS, ("middle",),
                         "scripts") == ["pkg/lib.py:1 imports pkg.base._hidden: a private name",
                                        "pkg/lib.py:2 imports pkg.app, which is 'top', above or "
                                        "beside 'middle'"]
  assert import_problems("scripts.run", modules["scripts.run"], PLANTED_LEVELS, (),
                         "scripts") == ["scripts/run.py:3 uses pkg.base._hidden: a private name",
                                        "scripts/run.py:4 uses pkg.base._hidden: a private name"]
