"""Every check of a pretraining config: values, types, evaluators, and resuming a run.

`validate` checks every field before anything is built or written (each entry
point calls it once; config_lib.resolve then derives from the checked config).
`check_types` compares every field with the base config's field of the same
name, so `--config.dds.beta_init=abc` fails naming the field before anything
is built or written. `check_resume_compatible` compares the config a run saved
(`workdir/config.json`) with the one a rerun requests, before the rerun writes
anything, and refuses the changes a checkpoint cannot follow.
"""

from __future__ import annotations

import numbers
import re

import ml_collections
import numpy as np

from ddae_jax import config_evals, config_lib
from ddae_jax.config_lib import ConfigError, fail
from ddae_jax.models.vit import VIT_SIZES

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


# ------------------------------------------------------------------- values
def one_of(config, field, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    fail(field, value, f"one of {tuple(allowed)}")


def check_patch_grid(m) -> None:
  """model.patch_size > 0 and model.image_size a multiple of it (pretraining and evaluation)."""
  if m.patch_size <= 0:
    fail("model.patch_size", m.patch_size, "a positive integer")
  if m.image_size <= 0 or m.image_size % m.patch_size:
    fail("model.image_size", m.image_size,
          f"a positive multiple of model.patch_size = {m.patch_size}")


def _validate_tokenizer(config):
  t = config.tokenizer
  one_of(config, "tokenizer.size", VIT_SIZES)
  if t.patch_size != config.model.patch_size:
    fail("tokenizer.patch_size", t.patch_size,
          f"model.patch_size = {config.model.patch_size}: one token per student patch")
  for field in ("code_dim", "vocab_size"):
    if t[field] < 1:
      fail(f"tokenizer.{field}", t[field], "an integer >= 1")
  if not (t.checkpoint or t.random_weights):
    fail("tokenizer.checkpoint", t.checkpoint,
          "the path of BEiT-v2's vqkd_encoder_base_decoder_3x768x12_clip-*.pth "
          "(or tokenizer.random_weights = True, for tests)")


def _validate_cls_pt(config):
  depth = config_lib.encoder_dims(config)[1]
  if not 0 <= config.cls_pt.early_block < depth:
    fail("cls_pt.early_block", config.cls_pt.early_block,
          f"0 (no class-token head) or a block in [1, {depth - 1}]")
  if config.cls_pt.early_block and config.cls_pt.head_depth < 1:
    fail("cls_pt.head_depth", config.cls_pt.head_depth, "an integer >= 1")


def validate(config, num_devices: int | None = None) -> None:
  """Checks every field of a pretraining config, before any compute (once per entry point).

  Args:
    config: a pretraining config.
    num_devices: devices of the mesh; when given, checks the mesh and batch.

  Raises:
    ConfigError naming the field, its value and the allowed values.
  """
  check_types(config, config_lib.base_config())  # types before ranges
  for field, allowed in config_lib.CHOICES:
    one_of(config, field, allowed)
  if config.model.layer_scale < 0:
    fail("model.layer_scale", config.model.layer_scale, "0 (off) or a value > 0")
  if not 0 <= config.data.color_jitter < 1:
    fail("data.color_jitter", config.data.color_jitter, "a value in [0, 1)")
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    fail("data.crop_scale", tuple(config.data.crop_scale), "(low, high) with 0 < low <= high <= 1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "steps_in_flight"):
    if config[field] < 1:
      fail(field, config[field], "an integer >= 1")
  if config.data.max_consecutive_failures < 1:
    fail("data.max_consecutive_failures", config.data.max_consecutive_failures,
          "an integer >= 1")
  check_patch_grid(config.model)
  if not 0.0 < config.masking.ratio < 1.0:
    fail("masking.ratio", config.masking.ratio, "a value in the open interval (0, 1)")
  m = config.masking
  if m.min_patches < 1:
    fail("masking.min_patches", m.min_patches, "an integer >= 1")
  if m.max_patches != 0 and m.max_patches < m.min_patches:
    fail("masking.max_patches", m.max_patches,
          f"0 (no bound) or an integer >= masking.min_patches = {m.min_patches}")
  if not 0.0 <= m.block_ratio <= m.ratio:
    fail("masking.block_ratio", m.block_ratio,
          f"a value in [0, masking.ratio = {m.ratio}] (0: all masked patches by rectangles)")
  if config.method == "beitv2":
    _validate_tokenizer(config)
    _validate_cls_pt(config)
  elif not (config.pixel.enabled or config.distill.enabled):
    fail("pixel.enabled", config.pixel.enabled,
          "True, or distill.enabled = True: at least one branch must train")

  depth = config_lib.encoder_dims(config)[1]
  k = config.dds.num_supervised
  if config.dds.deep_supervision and not config.dds.blocks:
    if k < 1 or depth % k:
      fail("dds.num_supervised", k, f"a divisor of the encoder depth {depth}, "
            "or explicit indices in dds.blocks")
  blocks = config_lib.supervised_blocks(config)
  if (any(b < 1 or b > depth for b in blocks) or list(blocks) != sorted(set(blocks))):
    fail("dds.blocks", tuple(blocks),
          f"distinct increasing block indices in [1, {depth}] (1-based)")
  if len(config_lib.block_weights(config)) != len(blocks):
    fail("dds.block_weights", tuple(config.dds.block_weights),
          f"{len(blocks)} values, one per supervised block {blocks}, or () for the default")
  if np.asarray(config.dds.beta_init).size not in (1, len(blocks)):
    fail("dds.beta_init", tuple(config.dds.beta_init),
          f"one value or {len(blocks)} values, one per supervised block {blocks}")
  if config.dds.reg_weight < 0:
    fail("dds.reg_weight", config.dds.reg_weight, "a value >= 0")
  for field in ("pixel.decoder_width", "pixel.decoder_depth", "pixel.decoder_heads",
                "distill.decoder_depth"):
    branch, name = field.split(".")
    if config[branch][name] < 1:
      fail(field, config[branch][name], "an integer >= 1")
  if config.pixel.decoder_width % config.pixel.decoder_heads:
    fail("pixel.decoder_heads", config.pixel.decoder_heads,
          f"a divisor of pixel.decoder_width = {config.pixel.decoder_width}")

  e = config.ema
  if not 0.0 <= e.momentum_end < 1.0:
    fail("ema.momentum_end", e.momentum_end, "a value in [0, 1)")
  if not 0.0 <= e.momentum_start <= e.momentum_end:
    fail("ema.momentum_start", e.momentum_start,
          f"a value in [0, ema.momentum_end = {e.momentum_end}]")
  if e.schedule == "bootmae" and not e.momentum_start <= e.momentum_mid <= e.momentum_end:
    fail("ema.momentum_mid", e.momentum_mid,
          f"a value in [ema.momentum_start = {e.momentum_start}, "
          f"ema.momentum_end = {e.momentum_end}]")
  for field in ("mid_epochs", "ramp_epochs"):
    if e[field] < 0:
      fail(f"ema.{field}", e[field], "a value >= 0")
  if not 0.0 <= config.distill.weight_ramp <= 1.0:
    fail("distill.weight_ramp", config.distill.weight_ramp,
          "a fraction of the epochs in [0, 1] (0: weight 1 from the start)")
  o = config.optim
  if o.base_lr <= 0:
    fail("optim.base_lr", o.base_lr, "a value > 0")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      fail(f"optim.{name}", o[name], "a value in [0, 1)")
  if o.eps <= 0:
    fail("optim.eps", o.eps, "a value > 0")
  if o.weight_decay < 0:
    fail("optim.weight_decay", o.weight_decay, "a value >= 0")
  if not set(o.no_decay_names) <= set(config_lib.NO_DECAY_CHOICES):
    fail("optim.no_decay_names", o.no_decay_names,
         f"a tuple of parameter names among {config_lib.NO_DECAY_CHOICES}")
  if not 0 <= o.warmup_epochs < config.epochs:
    fail("optim.warmup_epochs", o.warmup_epochs, f"a value in [0, epochs = {config.epochs}): "
         "the cosine decay after the warm-up needs at least one step")
  if config.epochs <= 0:
    fail("epochs", config.epochs, "a value > 0")
  if config.batch_size < 1:
    fail("batch_size", config.batch_size, "an integer >= 1")

  axes = dict(config.sharding.mesh)
  if set(axes) != {"data", "fsdp"}:
    fail("sharding.mesh", config.sharding.mesh, "axes ('data', n) and ('fsdp', n)")
  for pattern, spec in config.sharding.rules:
    try:
      re.compile(pattern)
    except re.error as err:
      fail("sharding.rules", pattern, f"a valid regular expression ({err})")
    if spec not in ("replicate", "fsdp"):
      fail("sharding.rules", spec, "'replicate' or 'fsdp' for each rule")
  if num_devices is not None:
    sizes = [s for s in axes.values() if s != -1]
    fixed = int(np.prod(sizes)) if sizes else 1
    if list(axes.values()).count(-1) > 1 or num_devices % fixed:
      fail("sharding.mesh", config.sharding.mesh,
            f"axis sizes whose product divides the {num_devices} devices, at most one -1")
    if config.batch_size % num_devices:
      fail("batch_size", config.batch_size,
            f"a multiple of the data-parallel size {num_devices} (data x fsdp devices)")
  check_evals(config, num_devices)


def check_evals(config, num_devices: int | None = None) -> None:
  """Checks every evaluator of config.evals; raises ConfigError naming `evals.<name>.<field>`."""
  reference = config_evals.knn(1.0, 1, "test", 0, 1)
  depth = config_lib.encoder_dims(config)[1]
  for name, ev in config.get("evals", {}).items():
    f = f"evals.{name}"
    if not isinstance(ev, (ml_collections.ConfigDict, dict)):
      fail(f, ev, "an evaluator section (config_evals.knn(...))")
    missing = sorted(set(reference) - set(ev))
    if missing:
      fail(f, dict(ev), f"an evaluator with the fields {sorted(reference)} (missing {missing})")
    check_types(ml_collections.ConfigDict({name: ev}),
                              ml_collections.ConfigDict({name: reference}), prefix="evals.")
    one_of(config, f"{f}.kind", config_evals.KINDS)
    one_of(config, f"{f}.encoder", config_evals.ENCODERS)
    one_of(config, f"{f}.pooling", config_evals.POOLINGS)
    if ev.encoder == "ema" and (config.method != "ddae" or not config.distill.enabled):
      fail(f"{f}.encoder", ev.encoder, "'online': this run has no momentum encoder "
           "(only DDAE with distill.enabled = True keeps one)")
    for field in ("every_epochs", "every_steps", "bank_size", "num_queries", "num_classes"):
      if ev[field] < 0:
        fail(f"{f}.{field}", ev[field], "a value >= 0 (0: see config_evals.py)")
    if not 0 <= ev.block <= depth:
      fail(f"{f}.block", ev.block, f"0 (the method's lineage) or a block in [1, {depth}]")
    for field in ("k", "batch_size"):
      if ev[field] < 1:
        fail(f"{f}.{field}", ev[field], "an integer >= 1")
    if 0 < ev.bank_size < ev.k:
      fail(f"{f}.bank_size", ev.bank_size, f"0 (the whole split) or at least k = {ev.k}")
    if ev.temperature <= 0:
      fail(f"{f}.temperature", ev.temperature, "a value > 0")
    if not 0 < ev.crop_ratio <= 1:
      fail(f"{f}.crop_ratio", ev.crop_ratio, "a value in (0, 1]")
    for field in ("bank_split", "query_split"):
      if not ev[field]:
        fail(f"{f}.{field}", ev[field], "a split of config.data (e.g. 'train', 'validation')")
    if num_devices is not None and ev.batch_size % num_devices:
      fail(f"{f}.batch_size", ev.batch_size, f"a multiple of the {num_devices} devices")
