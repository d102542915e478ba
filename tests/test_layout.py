"""The package's layout (docs/style.md): imports point down, binaries are thin."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ddae_jax"
BINARIES = ("main", "finetune", "linear_probe", "knn", "convert", "analyze", "aot", "bench",
            "bench_input", "sweep")
# Highest first; a module may import its own level (within its room) and any lower one.
# The first matching prefix names a module's level.
LEVELS = (
    ("binaries", tuple(f"ddae_jax.{b}" for b in BINARIES)),
    ("tools", ("ddae_jax.cli", "ddae_jax.perf.aot", "ddae_jax.perf.aot_evals",
               "ddae_jax.perf.bench",
               "ddae_jax.perf.input_bench", "ddae_jax.analysis.commands")),
    # Pretraining runs the evaluators of config.evals inside its loop.
    ("pretraining", ("ddae_jax.train",)),
    ("trainers", ("ddae_jax.evaluation", "ddae_jax.analysis", "ddae_jax.weights.convert")),
    ("step", ("ddae_jax.train_step",)),
    ("methods", ("ddae_jax.methods",)),
    ("training parts", ("ddae_jax.optim", "ddae_jax.runtime")),
    ("formats", ("ddae_jax.weights", "ddae_jax.perf.flops", "ddae_jax.perf")),
    ("configs", ("ddae_jax.config_lib", "ddae_jax.config_checks", "ddae_jax.ablations",
                 "ddae_jax.config_attention", "ddae_jax.config_evals")),
    ("loss math", ("ddae_jax.objectives",)),
    ("foundations", ("ddae_jax.models", "ddae_jax.data", "ddae_jax.sharding",
                     "ddae_jax.metrics", "ddae_jax.cluster", "ddae_jax")),
)


# config_lib, config_checks, ablations, config_attention and config_evals are one config
# split in five (fields and checks, type and resume checks, the paper's rows, the attention
# choice, the evaluators inside pretraining);
# they import each other lazily.
SIDEWAYS = ("configs",)


def _room(module: str) -> str:
  """A package of ddae_jax, or a top-level module: "ddae_jax.evaluation", "ddae_jax.train"."""
  return ".".join(module.split(".")[:2])


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _level(module: str) -> int:
  for i, (_, prefixes) in enumerate(LEVELS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{module} is in no level of tests/test_layout.py")


def _imports(tree: ast.AST) -> list[tuple[str, str | None, int]]:
  """(module, imported name or None, line) of every ddae_jax import, lazy ones included."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddae_jax"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        # `from ddae_jax.x import y`: y is a module when y.py or y/ exists.
        is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / sub.replace(".", "/")).is_dir()
        found.append((sub if is_module else node.module, None if is_module else alias.name,
                      node.lineno))
    elif isinstance(node, ast.Import):
      found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("ddae_jax")]
  return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_level_and_every_binary_exists():
  for module in MODULES:
    _level(module)
  for b in BINARIES:
    assert f"ddae_jax.{b}" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_take_no_private_names(module):
  tree = ast.parse(MODULES[module].read_text())
  for target, name, line in _imports(tree):
    where = f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target}"
    assert name is None or not name.startswith("_"), f"{where}.{name}: a private name"
    mine, theirs = _level(module), _level(target)
    sideways = theirs == mine and (_room(target) == _room(module)
                                   or LEVELS[mine][0] in SIDEWAYS)
    assert theirs > mine or sideways, (
        f"{where}, which is {LEVELS[theirs][0]!r}, above or beside {LEVELS[mine][0]!r}")


@pytest.mark.parametrize("binary", BINARIES)
def test_binaries_are_thin(binary):
  """A binary holds its docstring, its imports and a __main__ call; sweep.py is its own tool."""
  tree = ast.parse(MODULES[f"ddae_jax.{binary}"].read_text())
  functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
  limit = 4 if binary == "sweep" else 1
  assert len(functions) <= limit, [f.name for f in functions]


def test_no_merge_conflict_markers():
  """A merge that kept both sides' markers (docs/style.md and docs/decisions.md once did)."""
  root = PACKAGE.parent
  found = []
  for path in sorted(root.glob("**/*")):
    if path.suffix not in {".py", ".md", ".sh", ".toml", ".cfg", ".txt"} or any(
        part.startswith(".") or part in {"peers", "build"} for part in path.relative_to(
            root).parts):
      continue
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "=======":
        found.append(f"{path.relative_to(root)}:{number}")
  assert not found, f"merge conflict markers: {found}"
