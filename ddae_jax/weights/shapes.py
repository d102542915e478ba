"""One comparison of names and shapes for every loader: what a file holds vs. what a config builds.

Checkpointed encoders (`pretrained.check_encoder`), timm/MAE state dicts
(`torch_vit.check_state_dict`), VQ-KD tokenizer files (`vqkd.check_state_dict`)
and converted tokenizer parameters (`vqkd.check_params`) all fail the same
way: one line per misshapen, missing or unexpected name, so a wrong file is
fixed from the message alone.
"""

from __future__ import annotations

import jax

from ddae_jax.sharding import path_str

# Lines listed before "... and N more": a whole ViT-L's worth would bury the header.
MAX_LINES = 80


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
  """{"a/b/c": shape} of every array leaf (anything with a shape and a dtype) of a tree.

  Args:
    tree: nested dicts, lists or named tuples of arrays, ShapeDtypeStructs or
      Orbax array metadata; a flat state dict keeps its names ("blocks.0.norm1.weight").
      Other leaves (Python numbers, strings) are left out.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
  return {path_str(path): tuple(int(d) for d in leaf.shape)
          for path, leaf in leaves if _is_array(leaf)}


def check_shapes(found: dict[str, tuple], expected: dict[str, tuple], error: type[Exception],
                 header: str, missing: str = "missing", unexpected: str = "unexpected") -> None:
  """Raises `error` listing every misshapen, missing and unexpected name; returns if none.

  The message is "HEADER (N problems):", then one line per name, sorted:
    shape mismatch: NAME expected SHAPE, found SHAPE
    MISSING: NAME SHAPE          (in `expected` only)
    UNEXPECTED: NAME SHAPE       (in `found` only)

  Args:
    found: {name: shape} of what was read (e.g. `shapes_of(params)`).
    expected: {name: shape} of what the config builds.
    error: the exception class raised, called with the message.
    header: what differs, e.g. "the state dict is not a ViT-base/16".
    missing: how a name only in `expected` is introduced, e.g. "missing from the checkpoint".
    unexpected: how a name only in `found` is introduced.
  """
  found = {k: tuple(int(d) for d in v) for k, v in found.items()}
  expected = {k: tuple(int(d) for d in v) for k, v in expected.items()}
  lines = [f"  shape mismatch: {k} expected {expected[k]}, found {found[k]}"
           for k in sorted(expected.keys() & found.keys()) if expected[k] != found[k]]
  lines += [f"  {missing}: {k} {expected[k]}" for k in sorted(expected.keys() - found.keys())]
  lines += [f"  {unexpected}: {k} {found[k]}" for k in sorted(found.keys() - expected.keys())]
  if lines:
    more = len(lines) - MAX_LINES
    raise error(f"{header} ({len(lines)} problem{'s' * (len(lines) > 1)}):\n"
                + "\n".join(lines[:MAX_LINES]) + (f"\n  ... and {more} more" if more > 0 else ""))

