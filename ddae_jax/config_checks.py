"""Checks on a whole config beyond its value ranges: field types, and resuming a run.

`check_types` compares every field with the base config's field of the same
name, so `--config.dds.beta_init=abc` fails naming the field before anything
is built or written. `check_resume_compatible` compares the config a run saved
(`workdir/config.json`) with the one a rerun requests, before the rerun writes
anything, and refuses the changes a checkpoint cannot follow.
"""

from __future__ import annotations

import numbers

import ml_collections

from ddae_jax.config_lib import ConfigError

# Fields whose base value is an empty tuple: what their elements must be.
_ELEMENT_TYPES = {"dds.blocks": int, "dds.block_weights": float}  # (empty by default)

# Fields that decide the train state's tree (which parameters, their shapes,
# the optimizer state's layout). A checkpoint restores only into the same tree.
STATE_FIELDS = (
    "method", "model.size", "model.patch_size", "model.pos_embed", "model.feature_norm",
    "pixel.enabled", "pixel.decoder_width", "pixel.decoder_depth", "pixel.decoder_heads",
    "pixel.dds", "distill.enabled", "distill.decoder_depth", "distill.dds",
    "dds.deep_supervision", "dds.num_supervised", "dds.blocks", "dds.dynamic",
    "dds.beta_per_branch", "dds.beta_learnable", "tokenizer.size", "tokenizer.patch_size",
    "tokenizer.code_dim", "tokenizer.vocab_size")

# Fields a resumed run cannot change without changing what its step counts:
# the step, the learning-rate and momentum schedules and the input position
# are all in steps of the saved batch size.
STEP_FIELDS = ("batch_size",)


def _type_name(t) -> str:
  return {bool: "a bool", int: "an integer", float: "a number", str: "a string"}[t]


def _check_value(field: str, value, reference) -> None:
  """Raises ConfigError if `value` does not have the type of `reference` (the base value)."""
  def fail(expected):
    raise ConfigError(f"config.{field} = {value!r} has the wrong type: expected {expected}")
  if isinstance(reference, ml_collections.ConfigDict):
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      fail("a config section")
    for name in value:
      if name in reference:
        _check_value(f"{field}.{name}", value[name], reference[name])
  elif isinstance(reference, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      fail(f"a tuple like {tuple(reference)!r}")
    if not reference:
      element = _ELEMENT_TYPES.get(field)
      for v in value if element else ():
        _check_scalar_or_tuple(field, value, v, element())
    elif len(value) == len(reference):  # positional: ("data", -1) pairs, (low, high)
      for v, r in zip(value, reference, strict=True):
        _check_scalar_or_tuple(field, value, v, r)
    else:  # a homogeneous tuple of another length (beta_init: 1 or K values)
      for v in value:
        _check_scalar_or_tuple(field, value, v, reference[0])
  elif isinstance(reference, bool):
    if not isinstance(value, bool):
      fail(_type_name(bool))
  elif isinstance(reference, (int, float)):
    ok = isinstance(value, numbers.Integral if isinstance(reference, int) else numbers.Real)
    if not ok or isinstance(value, bool):
      fail(_type_name(int if isinstance(reference, int) else float))
  elif isinstance(reference, str) and not isinstance(value, str):
    fail(_type_name(str))


def _check_scalar_or_tuple(field, whole, value, reference):
  """One element of a tuple field; the error shows the whole tuple."""
  try:
    _check_value(field, value, reference)
  except ConfigError:
    kind = (f"tuple elements like {reference!r}" if isinstance(reference, (tuple, list))
            else _type_name(type(reference)) + " in each element")
    raise ConfigError(f"config.{field} = {whole!r} has the wrong type: expected "
                      f"{kind}") from None


def check_types(config, reference, prefix: str = "") -> None:
  """Every field of `config` that `reference` (the base config) has holds a value of its type.

  Integers are accepted where the base holds a float, never the reverse; bools
  are not numbers here. `prefix` goes before the field names (a section's checks).

  Raises:
    ConfigError naming the field, the value and the expected type.
  """
  for name in config:
    if name in reference:
      _check_value(prefix + name, config[name], reference[name])


# ------------------------------------------------------------------- resuming
def _get(config, field):
  value = config
  for part in field.split("."):
    if not hasattr(value, "get") or part not in value:
      return _MISSING
    value = value[part]
  return _as_tuples(value)


_MISSING = object()


def _as_tuples(value):
  """JSON turns tuples into lists; compare both as tuples."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_tuples(v) for v in value)
  return value


def resume_differences(saved, requested) -> list[tuple[str, object, object]]:
  """(field, saved value, requested value) for each state or step field that differs.

  Fields the saved config lacks (older runs) are not compared.
  """
  out = []
  for field in STATE_FIELDS + STEP_FIELDS:
    old, new = _get(saved, field), _get(requested, field)
    if old is not _MISSING and new is not _MISSING and old != new:
      out.append((field, old, new))
  return out


def check_resume_compatible(saved, requested, where: str) -> None:
  """Refuses a resume whose config changes the state's tree or the meaning of a step.

  Args:
    saved: the config the run being resumed saved (its config.json).
    requested: the config of this invocation.
    where: the run's directory, for the message.

  Raises:
    ConfigError naming every such field with its saved and requested values.
  """
  diffs = resume_differences(saved, requested)
  if not diffs:
    return
  lines = [f"  config.{f}: saved {old!r}, requested {new!r}" for f, old, new in diffs]
  reasons = []
  if any(f in STATE_FIELDS for f, _, _ in diffs):
    reasons.append("the checkpoint holds a different model (its parameters and optimizer "
                   "state do not fit the requested one)")
  if any(f in STEP_FIELDS for f, _, _ in diffs):
    reasons.append("the step count, learning-rate and momentum schedules and the input "
                   "position are in steps of the saved batch size, so the run would "
                   "train a different number of images than its epochs say")
  raise ConfigError(
      f"cannot resume the run in {where} with this config: "
      + "; and ".join(reasons) + ".\n" + "\n".join(lines)
      + "\nRerun with the saved values (they are in its config.json), or use a new "
      "--workdir for the new config. Nothing was written.")
