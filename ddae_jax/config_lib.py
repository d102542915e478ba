"""The pretraining config: its fields, the paper's defaults, the values derived from them.

`base_config()` is DDAE ViT-B/16, 100 epochs, as in section 4.1 and Appendix A;
the files in configs/ change what their experiment needs. Values that depend
on others (block indices, lambda_i, beta's branches, the attention kernel of
the platform, the steps over the dataset) are derived at run time, so an
override on the command line never leaves a stale derived value: the run's
entry point calls `config_checks.validate(config)` once, then
`resolve(config, platform, num_images)` once, and passes the frozen `Derived`
record down (methods, flops, aot, evaluators). The checks live in config_checks.py,
which imports this module; this module imports no check.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import ml_collections
import numpy as np

from ddae_jax import config_attention, config_evals
from ddae_jax.data.sources import SOURCES
from ddae_jax.models.vit import FEATURE_NORMS, POS_EMBEDS, VIT_SIZES
from ddae_jax.objectives.ddae import NORMALIZERS, TARGET_NORMS
from ddae_jax.objectives.masking import MASKINGS, num_masked

METHODS = ("ddae", "beitv2")
EMA_SCHEDULES = ("bootmae", "linear")
NORM_PIX_STATS = ("per_channel", "per_patch")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "", "xla", "cudnn", "pallas", "pallas_short")
# The Pallas kernels need the step's mesh (attention.kernel_mesh): pretraining only.
EVAL_ATTENTION_IMPLS = tuple(i for i in ATTENTION_IMPLS if not i.startswith("pallas"))
IMAGENET_TRAIN_IMAGES = 1_281_167


# The fields that take one of a fixed set of values, and the set.
CHOICES = (
    ("method", METHODS), ("model.size", VIT_SIZES), ("model.dtype", DTYPES),
    ("model.attention_impl", ATTENTION_IMPLS), ("model.feature_norm", FEATURE_NORMS),
    ("model.pos_embed", POS_EMBEDS), ("masking.kind", MASKINGS),
    ("dds.normalizer", NORMALIZERS), ("distill.target_norm", TARGET_NORMS),
    ("pixel.norm_pix_stats", NORM_PIX_STATS), ("ema.schedule", EMA_SCHEDULES),
    ("data.source", SOURCES),
)


# The >= 2-D parameters a no-decay list may name (1-D ones are never decayed).
NO_DECAY_CHOICES = ("cls_token", "mask_token", "pos_embed")


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names the field."""


def fail(field, value, allowed):
  raise ConfigError(f"config.{field} = {value!r} is invalid: allowed {allowed}")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "ddae": DDAE and the MAE rows (methods/ddae.py); "beitv2": BEiT-v2 (methods/beitv2.py).
  c.method = "ddae"

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"            # one of VIT_SIZES
  c.model.patch_size = 16
  c.model.image_size = 224
  c.model.dtype = "bfloat16"       # compute dtype; parameters stay float32
  # "auto": per platform and shapes (config_attention.py); "xla" (logits in the compute
  # dtype, softmax in float32), "" (jax.nn.dot_product_attention, float32 logits), "cudnn",
  # "pallas" (flash) or "pallas_short" (models/short_attention.py) force one.
  c.model.attention_impl = "auto"
  c.model.remat = False            # recompute blocks in the backward pass
  # f^(g_i) = LayerNorm(block g_i output): its own per block, or the final one.
  c.model.feature_norm = "per_block"
  c.model.pos_embed = "sincos"     # "learned": a parameter (imported timm/MAE weights)
  # BEiT's student (method = "beitv2"): pos_embed "none", one relative position
  # bias shared by all blocks, layer scale (per-channel branch gains) at 0.1.
  c.model.rel_pos_bias = False
  c.model.layer_scale = 0.0        # 0 disables

  # Section 4.1: blockwise masking at 75%, as BootMAE makes it (run_pretraining.py
  # --num_mask_patches 120 --min/max_mask_patches_per_block 16/60, then
  # utils.mask_to_index tops up to --mask_num 147 with uniformly random patches).
  c.masking = ml_collections.ConfigDict()
  c.masking.kind = "blockwise"     # or "random" (MAE)
  c.masking.ratio = 0.75           # all masked patches: 147 of 196
  c.masking.block_ratio = 120 / 196  # masked by rectangles; 0: all of `ratio` (BEiT)
  c.masking.min_patches = 16       # smallest rectangle, in patches (BEiT)
  c.masking.max_patches = 60       # largest rectangle (BootMAE); 0: no bound (BEiT)

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
  # What the weighted loss is divided by: the sum of the weights, so beta's
  # gradient follows the data (docs/decisions.md, issue 13); or "num_masked".
  c.dds.normalizer = "weight_sum"

  c.pixel = ml_collections.ConfigDict()
  c.pixel.enabled = True
  c.pixel.decoder_width = 512
  c.pixel.decoder_depth = 2
  c.pixel.decoder_heads = 16
  c.pixel.norm_pix = True          # per-patch normalised pixel targets
  # BootMAE: each patch's colour channels on their own (biased variance, eps
  # 1e-5); "per_patch": MAE's, all p x p x 3 values (unbiased, eps 1e-6).
  c.pixel.norm_pix_stats = "per_channel"
  c.pixel.dds = True               # False: last block, uniform weights (Table 4)

  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = True
  c.distill.decoder_depth = 2      # width and heads are the encoder's
  c.distill.target_norm = "layernorm"
  c.distill.pred_norm = True       # BootMAE: LayerNorm (no affine) of the prediction too
  # BootMAE's distillation weight min(4 (e + 1) / E, 1) per epoch e: the fraction
  # of the epochs over which it rises linearly to 1 (0: always 1).
  c.distill.weight_ramp = 0.25
  c.distill.dds = True             # False: last block, uniform weights (Table 4)

  # BEiT-v2's frozen VQ-KD tokenizer (method = "beitv2"); its input is the same crop.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.size = "base"        # its ViT, one of VIT_SIZES
  c.tokenizer.patch_size = 16
  c.tokenizer.code_dim = 32
  c.tokenizer.vocab_size = 8192
  c.tokenizer.checkpoint = ""      # vqkd_encoder_base_decoder_3x768x12_clip-*.pth
  c.tokenizer.random_weights = False  # True: random tokenizer (tests only)

  # BEiT-v2's class-token pretraining head (`_cls_pt`, method = "beitv2"): the
  # last block's class token joined with block `early_block`'s patch tokens runs
  # through `head_depth` more blocks, then the shared norm and LM head; its
  # masked-token loss is added to the encoder's. early_block = 0 disables it.
  c.cls_pt = ml_collections.ConfigDict()
  c.cls_pt.early_block = 0
  c.cls_pt.head_depth = 2

  # Momentum encoder, eq. 4. "bootmae" (BootMAE utils.adjust_ema_momentum with
  # --model_ema_dynamic), set once per epoch e: start -> mid linearly over
  # mid_epochs, then mid -> end over ramp_epochs more (paper: 0.999 -> 0.99999
  # in the first 400 epochs). "linear": start -> end over ramp_epochs, per step.
  c.ema = ml_collections.ConfigDict()
  c.ema.schedule = "bootmae"
  c.ema.momentum_start = 0.999
  c.ema.momentum_mid = 0.9999
  c.ema.mid_epochs = 100.0
  c.ema.momentum_end = 0.99999
  c.ema.ramp_epochs = 300.0

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4         # lr = base_lr * batch_size / 256
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8               # AdamW's epsilon
  c.optim.weight_decay = 0.05
  # Besides every 1-D parameter (biases, norms), kept out of weight decay: BootMAE's and
  # BEiT-v2's no_weight_decay; the MAE rows decay all (docs/decisions.md, issue 24).
  c.optim.no_decay_names = ("cls_token", "pos_embed")
  c.optim.warmup_epochs = 20.0
  c.optim.min_lr = 1e-4            # BootMAE's pretraining script (--min_lr 1e-4)
  c.optim.grad_clip_norm = 0.0     # 0 disables clipping
  c.optim.beta_lr_scale = 1.0      # beta's learning rate relative to the rest

  c.batch_size = 4096
  c.epochs = 100.0
  # The train set's size when none is given; the trainer passes the dataset's
  # own size to the step arithmetic (and records it in workdir/run.json).
  c.num_train_images = IMAGENET_TRAIN_IMAGES
  # > 0: train exactly this many steps whatever the epochs and the dataset's size
  # (smoke runs); schedules still count epochs.
  c.num_steps = 0

  # Input (section 4.1: random-resized crop and horizontal flip only).
  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"           # tfds | image_folder | digits | synthetic
  c.data.name = "imagenet2012"     # any TFDS image dataset
  c.data.split = "train"
  c.data.data_dir = ""             # TFDS data_dir ("" = TFDS's default); gs:// works
  c.data.folder = ""               # image_folder: <folder>/<split>/<class>/<image>
  c.data.crop_scale = (0.2, 1.0)   # MAE's RandomResizedCrop scale
  c.data.flip = True
  c.data.color_jitter = 0.0        # BEiT: brightness, contrast, saturation factors in 1 +- 0.4
  c.data.shuffle_buffer = 16384
  c.data.workers = 16              # host decode threads per process
  c.data.prefetch = 2              # batches prepared ahead
  c.data.synthetic_size = 1024     # images of the synthetic source
  # Undecodable images in a row after which the data is taken to be unreadable
  # (a wrong folder, a broken download): the run stops naming it.
  c.data.max_consecutive_failures = 100

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  # Steps dispatched ahead of the devices: the loop waits on an older step's
  # metrics beyond this, so a save or a preemption waits for at most this many.
  c.steps_in_flight = 2

  # Evaluators run between steps on the training mesh (config_evals.py): k-NN of the
  # online encoder by the method's own readout, every 10 epochs and at the end, on
  # the first 25,600 train images (about 26 per class) and 10,000 validation images.
  c.evals = ml_collections.ConfigDict()
  c.evals.knn = config_evals.knn(every_epochs=10.0, bank_size=25_600,
                                 query_split="validation", num_queries=10_000, batch_size=1024)

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
  c.masking.max_patches = 20       # 60 / 196 of the 8 x 8 grid
  c.pixel.decoder_width = 32
  c.pixel.decoder_heads = 4
  c.batch_size = 16
  c.epochs = 10.0
  c.num_train_images = 256
  c.optim.warmup_epochs = 1.0
  c.optim.base_lr = 1e-3
  c.optim.min_lr = 0.0
  # A 10-epoch toy: BootMAE's 100 + 300-epoch momentum schedule would never move.
  c.ema.schedule = "linear"
  c.ema.momentum_start = 0.99
  c.ema.momentum_end = 0.999
  c.ema.ramp_epochs = 5.0
  c.data.source = "synthetic"
  c.data.synthetic_size = 256
  c.data.workers = 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  # Tests and benchmarks train without an evaluator unless they ask for one.
  c.evals.knn.update(every_epochs=0.0, bank_size=0, query_split="test", batch_size=64)
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
  if c.ema.schedule == "linear":
    c.ema.ramp_epochs = 400.0  # BootMAE's schedule is already written in epochs


def _smoke(c):
  # A fixed number of steps whatever the data (an epoch of ImageNet would be
  # 160,000 steps of 8), each one logged; no warm-up or ramp, which count epochs.
  c.batch_size = 8
  c.num_steps = 20
  c.log_every_steps = 1
  c.checkpoint_every_steps = 10
  c.optim.warmup_epochs = 0.0
  c.ema.mid_epochs = c.ema.ramp_epochs = 0.0  # either schedule: the final momentum
  for ev in c.evals.values():  # every evaluator once, at the end, on a few images
    ev.update(every_steps=c.num_steps, bank_size=256, num_queries=128, batch_size=32)


def _fsdp(c):
  c.sharding.mesh = (("data", 1), ("fsdp", -1))
  c.sharding.rules = ((".*", "fsdp"),)


VARIANTS = {"ep100": lambda c: None, "ep800": _ep800, "smoke": _smoke, "fsdp": _fsdp}


# ----------------------------------------------------------------- derived values
def encoder_dims(config) -> tuple[int, int, int]:
  """(width, depth, heads) of config.model.size."""
  return VIT_SIZES[config.model.size]


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


def learning_rate(config) -> float:
  return config.optim.base_lr * config.batch_size / 256


# ------------------------------------------------------------- step arithmetic
def epochs_to_steps(config, epochs: float, num_images: int | None = None) -> int:
  """Steps of `epochs` passes over `num_images` (None: config.num_train_images)."""
  num_images = config.num_train_images if num_images is None else num_images
  return int(round(epochs * num_images / config.batch_size))


def total_steps(config, num_images: int | None = None) -> int:
  """Steps of the run: config.epochs over `num_images` (the dataset's size;
  None: config.num_train_images), or config.num_steps when set."""
  if config.get("num_steps", 0) > 0:
    return int(config.num_steps)
  return max(1, epochs_to_steps(config, config.epochs, num_images))


def check_steps(config, num_images: int | None = None) -> None:
  """Raises ConfigError unless the run has steps and its cosine decay has at least one.

  Steps depend on the dataset's size, so this runs where a run resolves them (`resolve`,
  evaluation/loop.resolve_steps), not in config_checks.validate. Without it optax stops with
  "cosine_decay_schedule requires positive decay_steps".
  """
  n = config.num_train_images if num_images is None else num_images
  fixed = config.get("num_steps", 0) > 0
  total = int(config.num_steps) if fixed else epochs_to_steps(config, config.epochs, n)
  per_epoch = f"over {n:,} images at batch {config.batch_size}"
  if total < 1:
    fail("epochs", config.epochs, f"at least {config.batch_size / (2 * n):.3g} (one step "
         f"{per_epoch}); {config.epochs} epochs round to 0 steps")
  warmup = epochs_to_steps(config, config.optim.warmup_epochs, n)
  if warmup >= total:
    length = (f"config.num_steps = {total}" if fixed
              else f"config.epochs = {config.epochs} ({total} steps {per_epoch})")
    raise ConfigError(
        f"config.optim.warmup_epochs = {config.optim.warmup_epochs} ({warmup} steps) is not "
        f"shorter than {length}: the cosine decay after the warm-up needs at least one step; "
        f"raise config.{'num_steps' if fixed else 'epochs'} or lower config.optim.warmup_epochs")


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's step arithmetic over its dataset, resolved once (`steps`); every protocol's.

  Attributes:
    num_images: the train set's size, which epochs count.
    batch_size: images per step (global).
    total: steps of the run; warmup: of its learning-rate warm-up.
    peak_lr: base_lr * batch_size / 256, the warm-up's end.
  """
  num_images: int
  batch_size: int
  total: int
  warmup: int
  peak_lr: float

  def of_epochs(self, epochs: float) -> int:
    """Steps of `epochs` passes over the train set."""
    return int(round(epochs * self.num_images / self.batch_size))

  def epoch(self, step):
    """The (fractional) epoch at `step` (an int or a traced array)."""
    return step * (self.batch_size / self.num_images)


def steps(config, num_images: int | None = None) -> Steps:
  """The step arithmetic of `config` over `num_images` (None: config.num_train_images).

  Plain arithmetic, so the schedules that need no decay (eq. 4's momentum, the
  distillation ramp) can be computed for any config; `check_steps` says whether it
  makes a learning-rate schedule.
  """
  n = config.num_train_images if num_images is None else int(num_images)
  return Steps(num_images=n, batch_size=int(config.batch_size),
               total=total_steps(config, n),
               warmup=epochs_to_steps(config, config.optim.warmup_epochs, n),
               peak_lr=learning_rate(config))


@dataclasses.dataclass(frozen=True)
class Supervision:
  """One branch's deep supervision: blocks g_i, lambda_i (eq. 3, 5), dynamic weights (eq. 2)."""
  blocks: tuple[int, ...]
  weights: tuple[float, ...]
  dynamic: bool


@dataclasses.dataclass(frozen=True)
class Derived:
  """What a pretraining config's fields imply, resolved once by `resolve`.

  Attributes:
    width, depth, heads: the encoder's (model.size).
    grid: (rows, cols) of patches; num_patches = rows * cols; num_masked: M.
    blocks, block_weights: g_1 < ... < g_K and lambda_i of the supervised blocks.
    branches: {"pixel", "distill"} (DDAE) or {"mim"} (BEiT-v2) -> Supervision.
    beta_branches: the sets of beta the parameters hold ("shared", or per branch).
    beta_init: the initial beta of each supervised block (paper: -0.5).
    platform: the backend the step compiles for ("cpu", "gpu", "tpu").
    attention_impl: models.attention.attend's `impl` on that platform.
    steps: the step arithmetic over the run's dataset (Steps).
  """
  width: int
  depth: int
  heads: int
  grid: tuple[int, int]
  num_patches: int
  num_masked: int
  blocks: tuple[int, ...]
  block_weights: tuple[float, ...]
  branches: dict[str, Supervision]
  beta_branches: tuple[str, ...]
  beta_init: tuple[float, ...]
  platform: str
  attention_impl: str | None
  steps: Steps

  def __post_init__(self):
    # Read-only all the way down: the record is shared by every module of a model.
    object.__setattr__(self, "branches", types.MappingProxyType(dict(self.branches)))


def resolve(config, platform: str | None = None, num_images: int | None = None) -> Derived:
  """The derived values of a validated pretraining config, once per run.

  Args:
    platform: the backend the step compiles for (None: jax's default backend).
    num_images: the train set's size, which epochs count (None: config.num_train_images).

  Raises:
    ConfigError: the steps make no learning-rate schedule (`check_steps`).
  """
  check_steps(config, num_images)
  width, depth, heads = encoder_dims(config)
  grid = grid_size(config)
  platform = platform or jax.default_backend()
  names = ("mim",) if config.get("method", "ddae") == "beitv2" else ("pixel", "distill")
  return Derived(
      width=width, depth=depth, heads=heads, grid=grid, num_patches=grid[0] * grid[1],
      num_masked=num_masked(config.masking.ratio, grid), blocks=supervised_blocks(config),
      block_weights=block_weights(config),
      branches={n: Supervision(*branch_supervision(config, n)) for n in names},
      beta_branches=beta_branches(config),
      beta_init=tuple(float(b) for b in beta_init(config)), platform=platform,
      attention_impl=config_attention.attention_impl(config, platform),
      steps=steps(config, num_images))
