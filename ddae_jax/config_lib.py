"""The pretraining config: its fields, the paper's defaults, derived values, checks.

`base_config()` is DDAE ViT-B/16, 100 epochs, as in section 4.1 and Appendix A;
the files in configs/ change what their experiment needs. Values that depend
on others (block indices, lambda_i, steps) are derived here, at run time, so an
override on the command line never leaves a stale derived value.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np

from ddae_jax.data.sources import SOURCES
from ddae_jax.models.vit import FEATURE_NORMS, POS_EMBEDS, VIT_SIZES
from ddae_jax.objectives.ddae import NORMALIZERS, TARGET_NORMS
from ddae_jax.objectives.masking import MASKINGS

METHODS = ("ddae", "beitv2")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "", "xla", "cudnn")
IMAGENET_TRAIN_IMAGES = 1_281_167


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "ddae": DDAE and the MAE rows (model.py); "beitv2": BEiT-v2 (beitv2.py).
  c.method = "ddae"

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"            # one of VIT_SIZES
  c.model.patch_size = 16
  c.model.image_size = 224
  c.model.dtype = "bfloat16"       # compute dtype; parameters stay float32
  # "auto": per platform (attention_impl()); "" is jax's default (XLA); "xla" or "cudnn" force one.
  c.model.attention_impl = "auto"
  c.model.remat = False            # recompute blocks in the backward pass
  # f^(g_i) = LayerNorm(block g_i output): its own per block, or the final one.
  c.model.feature_norm = "per_block"
  c.model.pos_embed = "sincos"     # "learned": a parameter (imported timm/MAE weights)

  c.masking = ml_collections.ConfigDict()
  c.masking.kind = "blockwise"     # section 4.1: blockwise masking
  c.masking.ratio = 0.75
  c.masking.min_patches = 16       # BEiT's smallest rectangle

  # Deep dynamic supervision (section 3.2).
  c.dds = ml_collections.ConfigDict()
  c.dds.deep_supervision = True    # False: supervise the last block only
  c.dds.num_supervised = 4         # K; blocks g_i = (B / K) * i
  c.dds.blocks = ()                # explicit 1-based indices, overriding K
  c.dds.block_weights = ()         # lambda_i; () means [0.75] * (K - 1) + [1]
  c.dds.dynamic = True             # False: uniform weights on masked patches
  c.dds.beta_init = (-0.5,)        # one value for all blocks, or K values
  c.dds.beta_learnable = True
  c.dds.beta_per_branch = False    # one beta per block shared by both branches
  c.dds.reg_weight = 0.5           # lambda of eq. 6
  c.dds.normalizer = "num_masked"  # what the weighted loss is divided by

  c.pixel = ml_collections.ConfigDict()
  c.pixel.enabled = True
  c.pixel.decoder_width = 512
  c.pixel.decoder_depth = 2
  c.pixel.decoder_heads = 16
  c.pixel.norm_pix = True          # per-patch normalised pixel targets
  c.pixel.dds = True               # False: last block, uniform weights (Table 4)

  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = True
  c.distill.decoder_depth = 2      # width and heads are the encoder's
  c.distill.target_norm = "layernorm"
  c.distill.dds = True             # False: last block, uniform weights (Table 4)

  # BEiT-v2's frozen VQ-KD tokenizer (method = "beitv2"); its input is the same crop.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.size = "base"        # its ViT, one of VIT_SIZES
  c.tokenizer.patch_size = 16
  c.tokenizer.code_dim = 32
  c.tokenizer.vocab_size = 8192
  c.tokenizer.checkpoint = ""      # vqkd_encoder_base_decoder_3x768x12_clip-*.pth
  c.tokenizer.random_weights = False  # True: random tokenizer (tests only)

  # Momentum encoder, eq. 4: momentum rises linearly from start to end over
  # ramp_epochs, then stays (paper, 800 epochs: 0.999 -> 0.99999 in 400).
  c.ema = ml_collections.ConfigDict()
  c.ema.momentum_start = 0.999
  c.ema.momentum_end = 0.99999
  c.ema.ramp_epochs = 50.0

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4         # lr = base_lr * batch_size / 256
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 20.0
  c.optim.min_lr = 0.0
  c.optim.grad_clip_norm = 0.0     # 0 disables clipping
  c.optim.beta_lr_scale = 1.0      # beta's learning rate relative to the rest

  c.batch_size = 4096
  c.epochs = 100.0
  c.num_train_images = IMAGENET_TRAIN_IMAGES  # replaced by the dataset's size at run time

  # Input (section 4.1: random-resized crop and horizontal flip only).
  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"           # tfds | image_folder | digits | synthetic
  c.data.name = "imagenet2012"     # any TFDS image dataset
  c.data.split = "train"
  c.data.data_dir = ""             # TFDS data_dir ("" = TFDS's default); gs:// works
  c.data.folder = ""               # image_folder: <folder>/<split>/<class>/<image>
  c.data.crop_scale = (0.2, 1.0)   # MAE's RandomResizedCrop scale
  c.data.flip = True
  c.data.shuffle_buffer = 16384
  c.data.workers = 16              # host decode threads per process
  c.data.prefetch = 2              # batches prepared ahead
  c.data.synthetic_size = 1024     # images of the synthetic source

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3

  # Mesh axes and sizes (-1: all remaining devices) and parameter sharding
  # rules: (regex on the parameter path, "replicate" | "fsdp"); first match wins.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh = (("data", -1), ("fsdp", 1))
  c.sharding.rules = ((".*", "replicate"),)
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """The paper's method on a tiny ViT (64 wide, 4 deep, 32 px, patch 4), float32."""
  c = base_config()
  c.model.size = "tiny"
  c.model.patch_size = 4
  c.model.image_size = 32
  c.model.dtype = "float32"
  c.masking.min_patches = 4
  c.pixel.decoder_width = 32
  c.pixel.decoder_heads = 4
  c.batch_size = 16
  c.epochs = 10.0
  c.num_train_images = 256
  c.optim.warmup_epochs = 1.0
  c.optim.base_lr = 1e-3
  c.ema.momentum_start = 0.99
  c.ema.momentum_end = 0.999
  c.ema.ramp_epochs = 5.0
  c.data.source = "synthetic"
  c.data.synthetic_size = 256
  c.data.workers = 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  return c


def apply_variants(config, arg: str, variants: dict | None = None):
  """Applies the comma-separated variants of a config argument, e.g. "ep800,fsdp".

  `variants` maps names to functions that edit a config (default: the
  pretraining ones and the paper's method and ablation rows).
  """
  if variants is None:
    from ddae_jax import ablations  # the paper's method and ablation rows
    variants = {**VARIANTS, **ablations.VARIANTS}
  for variant in filter(None, (v.strip() for v in (arg or "").split(","))):
    if variant not in variants:
      raise ConfigError(f"unknown config variant {variant!r}: allowed {sorted(variants)}")
    variants[variant](config)
  return config


def _ep800(c):
  c.epochs = 800.0
  c.optim.warmup_epochs = 40.0
  c.ema.ramp_epochs = 400.0


def _smoke(c):
  c.batch_size = 8
  c.num_train_images = 80
  c.epochs = 2.0
  c.optim.warmup_epochs = 1.0
  c.ema.ramp_epochs = 1.0


def _fsdp(c):
  c.sharding.mesh = (("data", 1), ("fsdp", -1))
  c.sharding.rules = ((".*", "fsdp"),)


VARIANTS = {"ep100": lambda c: None, "ep800": _ep800, "smoke": _smoke, "fsdp": _fsdp}


# ----------------------------------------------------------------- derived values
def encoder_dims(config) -> tuple[int, int, int]:
  """(width, depth, heads) of config.model.size."""
  return VIT_SIZES[config.model.size]


def attention_impl(model_config, platform: str | None = None) -> str | None:
  """The `implementation` of jax.nn.dot_product_attention for model.attention_impl.

  "auto" follows the platform the step compiles for (default: jax's default
  backend): cuDNN's fused kernel on GPUs in 16-bit dtypes (it has no float32
  path), XLA's attention elsewhere. cuDNN does not lower for TPUs; a Pallas
  splash kernel is not used there because its 128-token blocks would pad the
  encoder's 50 visible tokens to 128 (docs/decisions.md, issue 17). On CPUs
  "auto", "" and "xla" are the same computation.
  """
  impl = model_config.attention_impl
  if impl != "auto":
    return impl or None
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda") and model_config.dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "xla"


def grid_size(config) -> tuple[int, int]:
  n = config.model.image_size // config.model.patch_size
  return (n, n)


def supervised_blocks(config) -> tuple[int, ...]:
  """The 1-based blocks g_1 < ... < g_K that get a loss."""
  depth = encoder_dims(config)[1]
  if not config.dds.deep_supervision:
    return (depth,)
  if config.dds.blocks:
    return tuple(int(b) for b in config.dds.blocks)
  k = config.dds.num_supervised
  return tuple(depth // k * i for i in range(1, k + 1))


def block_weights(config) -> tuple[float, ...]:
  """lambda_i of eq. 3 and 5 (paper: [0.75, 0.75, 0.75, 1])."""
  k = len(supervised_blocks(config))
  if not config.dds.deep_supervision:
    return (1.0,)
  if config.dds.block_weights:
    return tuple(float(w) for w in config.dds.block_weights)
  return (0.75,) * (k - 1) + (1.0,)


def branch_supervision(config, branch: str) -> tuple[tuple[int, ...], tuple[float, ...], bool]:
  """(blocks g_i, lambda_i, dynamic) of one branch ("pixel", "distill"; BEiT-v2: "mim").

  A DDAE branch with `dds = False` (Table 4) supervises only the last
  supervised block, with uniform weights.
  """
  # .get: configs saved before these fields existed (config.json) mean DDS on.
  if branch in ("pixel", "distill") and not config[branch].get("dds", True):
    return supervised_blocks(config)[-1:], (1.0,), False
  return supervised_blocks(config), block_weights(config), bool(config.dds.dynamic)


def beta_branches(config) -> tuple[str, ...]:
  """Which sets of beta the parameters hold: one shared, or one per dynamic branch."""
  if not config.dds.dynamic:
    return ()
  if config.get("method", "ddae") == "beitv2":
    return ("shared",)
  dynamic = tuple(b for b in ("pixel", "distill")
                  if config[b].enabled and config[b].get("dds", True))
  if not dynamic or not config.dds.beta_per_branch:
    return ("shared",) if dynamic else ()
  return dynamic


def beta_init(config) -> np.ndarray:
  """float32[K], the initial betas (paper: all -0.5)."""
  k = len(supervised_blocks(config))
  init = np.asarray(config.dds.beta_init, np.float32).reshape(-1)
  return np.broadcast_to(init, (k,)).copy() if init.size == 1 else init


def total_steps(config) -> int:
  return max(1, int(round(config.epochs * config.num_train_images / config.batch_size)))


def epochs_to_steps(config, epochs: float) -> int:
  return int(round(epochs * config.num_train_images / config.batch_size))


def learning_rate(config) -> float:
  return config.optim.base_lr * config.batch_size / 256


# ----------------------------------------------------------------------- checks
def _fail(field, value, allowed):
  raise ConfigError(f"config.{field} = {value!r} is invalid: allowed {allowed}")


def _one_of(config, field, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    _fail(field, value, f"one of {tuple(allowed)}")


def check_patch_grid(m) -> None:
  """model.patch_size > 0 and model.image_size a multiple of it (pretraining and evaluation)."""
  if m.patch_size <= 0:
    _fail("model.patch_size", m.patch_size, "a positive integer")
  if m.image_size <= 0 or m.image_size % m.patch_size:
    _fail("model.image_size", m.image_size,
          f"a positive multiple of model.patch_size = {m.patch_size}")


def _validate_tokenizer(config):
  t = config.tokenizer
  _one_of(config, "tokenizer.size", VIT_SIZES)
  if t.patch_size != config.model.patch_size:
    _fail("tokenizer.patch_size", t.patch_size,
          f"model.patch_size = {config.model.patch_size}: one token per student patch")
  for field in ("code_dim", "vocab_size"):
    if t[field] < 1:
      _fail(f"tokenizer.{field}", t[field], "an integer >= 1")
  if not (t.checkpoint or t.random_weights):
    _fail("tokenizer.checkpoint", t.checkpoint,
          "the path of BEiT-v2's vqkd_encoder_base_decoder_3x768x12_clip-*.pth "
          "(or tokenizer.random_weights = True, for tests)")


def validate(config, num_devices: int | None = None) -> None:
  """Checks every field the train step uses, before any compute.

  Args:
    config: a pretraining config.
    num_devices: devices of the mesh; when given, checks the mesh and batch.

  Raises:
    ConfigError naming the field, its value and the allowed values.
  """
  _one_of(config, "method", METHODS)
  _one_of(config, "model.size", VIT_SIZES)
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.attention_impl", ATTENTION_IMPLS)
  _one_of(config, "model.feature_norm", FEATURE_NORMS)
  _one_of(config, "model.pos_embed", POS_EMBEDS)
  _one_of(config, "masking.kind", MASKINGS)
  _one_of(config, "dds.normalizer", NORMALIZERS)
  _one_of(config, "distill.target_norm", TARGET_NORMS)
  _one_of(config, "data.source", SOURCES)
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    _fail("data.crop_scale", tuple(config.data.crop_scale), "(low, high) with 0 < low <= high <= 1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[field] < 1:
      _fail(field, config[field], "an integer >= 1")
  check_patch_grid(config.model)
  if not 0.0 < config.masking.ratio < 1.0:
    _fail("masking.ratio", config.masking.ratio, "a value in the open interval (0, 1)")
  if config.masking.min_patches < 1:
    _fail("masking.min_patches", config.masking.min_patches, "an integer >= 1")
  if config.method == "beitv2":
    _validate_tokenizer(config)
  elif not (config.pixel.enabled or config.distill.enabled):
    _fail("pixel.enabled", config.pixel.enabled,
          "True, or distill.enabled = True: at least one branch must train")

  depth = encoder_dims(config)[1]
  k = config.dds.num_supervised
  if config.dds.deep_supervision and not config.dds.blocks:
    if k < 1 or depth % k:
      _fail("dds.num_supervised", k, f"a divisor of the encoder depth {depth}, "
            "or explicit indices in dds.blocks")
  blocks = supervised_blocks(config)
  if (any(b < 1 or b > depth for b in blocks) or list(blocks) != sorted(set(blocks))):
    _fail("dds.blocks", tuple(blocks),
          f"distinct increasing block indices in [1, {depth}] (1-based)")
  if len(block_weights(config)) != len(blocks):
    _fail("dds.block_weights", tuple(config.dds.block_weights),
          f"{len(blocks)} values, one per supervised block {blocks}, or () for the default")
  if np.asarray(config.dds.beta_init).size not in (1, len(blocks)):
    _fail("dds.beta_init", tuple(config.dds.beta_init),
          f"one value or {len(blocks)} values, one per supervised block {blocks}")
  if config.dds.reg_weight < 0:
    _fail("dds.reg_weight", config.dds.reg_weight, "a value >= 0")
  for field in ("pixel.decoder_width", "pixel.decoder_depth", "pixel.decoder_heads",
                "distill.decoder_depth"):
    branch, name = field.split(".")
    if config[branch][name] < 1:
      _fail(field, config[branch][name], "an integer >= 1")
  if config.pixel.decoder_width % config.pixel.decoder_heads:
    _fail("pixel.decoder_heads", config.pixel.decoder_heads,
          f"a divisor of pixel.decoder_width = {config.pixel.decoder_width}")

  e = config.ema
  if not 0.0 <= e.momentum_end < 1.0:
    _fail("ema.momentum_end", e.momentum_end, "a value in [0, 1)")
  if not 0.0 <= e.momentum_start <= e.momentum_end:
    _fail("ema.momentum_start", e.momentum_start,
          f"a value in [0, ema.momentum_end = {e.momentum_end}]")
  if e.ramp_epochs < 0:
    _fail("ema.ramp_epochs", e.ramp_epochs, "a value >= 0")
  o = config.optim
  if o.base_lr <= 0:
    _fail("optim.base_lr", o.base_lr, "a value > 0")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      _fail(f"optim.{name}", o[name], "a value in [0, 1)")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", o.weight_decay, "a value >= 0")
  if not 0 <= o.warmup_epochs <= config.epochs:
    _fail("optim.warmup_epochs", o.warmup_epochs, f"a value in [0, epochs = {config.epochs}]")
  if config.epochs <= 0:
    _fail("epochs", config.epochs, "a value > 0")
  if config.batch_size < 1:
    _fail("batch_size", config.batch_size, "an integer >= 1")

  axes = dict(config.sharding.mesh)
  if set(axes) != {"data", "fsdp"}:
    _fail("sharding.mesh", config.sharding.mesh, "axes ('data', n) and ('fsdp', n)")
  for pattern, spec in config.sharding.rules:
    try:
      re.compile(pattern)
    except re.error as err:
      _fail("sharding.rules", pattern, f"a valid regular expression ({err})")
    if spec not in ("replicate", "fsdp"):
      _fail("sharding.rules", spec, "'replicate' or 'fsdp' for each rule")
  if num_devices is not None:
    sizes = [s for s in axes.values() if s != -1]
    fixed = int(np.prod(sizes)) if sizes else 1
    if list(axes.values()).count(-1) > 1 or num_devices % fixed:
      _fail("sharding.mesh", config.sharding.mesh,
            f"axis sizes whose product divides the {num_devices} devices, at most one -1")
    if config.batch_size % num_devices:
      _fail("batch_size", config.batch_size,
            f"a multiple of the data-parallel size {num_devices} (data x fsdp devices)")
