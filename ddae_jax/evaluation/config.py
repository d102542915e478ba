"""Configs of the evaluation binaries: fine-tuning, linear probing and k-NN.

Defaults are the protocols of the paper's Appendix A (which follows BEiT and
MAE): fine-tuning with AdamW and layer-wise lr decay, linear probing with
LARS on a frozen encoder behind a non-affine BatchNorm, and DINO's weighted
k-NN. Durations are epochs, turned into steps at run time from the train
set's size, so overriding the batch size never leaves a stale value.

Learning rates are written as base_lr with lr = base_lr * batch_size / 256
(MAE's rule). The paper gives the fine-tuning rates at batch 1024 (8e-3 for
ViT-B, 1.6e-2 for ViT-S), so base_lr is that / 4; ViT-L, which the paper does
not fine-tune, takes MAE's base_lr 1e-3 and 50 epochs.
"""

from __future__ import annotations

import ml_collections

from ddae_jax import config_checks, config_lib
from ddae_jax.config_checks import one_of
from ddae_jax.config_evals import POOLINGS
from ddae_jax.config_lib import ConfigError, fail  # noqa: F401 (ConfigError: re-exported)
from ddae_jax.data.sources import SOURCES
from ddae_jax.models.vit import VIT_SIZES
from ddae_jax.weights.pretrained import ENCODERS

PROTOCOLS = ("finetune", "linear_probe", "knn")
# (base_lr, layer_decay, drop_path, epochs) per size; base_lr * 1024 / 256 is
# the paper's rate at batch 1024.
FINETUNE_BY_SIZE = {
    "tiny": (1e-3, 0.75, 0.1, 100.0),
    "small": (1.6e-2 / 4, 0.75, 0.1, 100.0),
    "base": (8e-3 / 4, 0.65, 0.1, 100.0),
    "large": (1e-3, 0.75, 0.2, 50.0),
}


def _common(protocol: str, size: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.protocol = protocol
  c.seed = 0
  c.init_dir = ""        # the pretraining workdir (required)
  c.init_step = -1       # its checkpoint step; -1 = the latest
  c.encoder = "online"   # "online" (theta: every run has it) or "ema" (theta', DDAE runs only)
  c.random_init = False  # True: a randomly initialised encoder (seed), the baseline

  c.model = ml_collections.ConfigDict()
  c.model.size = size
  c.model.patch_size = 16
  c.model.image_size = 224
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "auto"  # see config_attention.attention_impl
  c.model.remat = False
  c.model.num_classes = 1000
  # What k-NN and the linear probe read (evaluation/readout.py): "cls" (normed class
  # token), "avg" (mean of patch tokens) of block `block` (1-based); "auto" and 0
  # follow the pretraining run's lineage (DDAE/BootMAE: "avg" of block 10 of ViT-B,
  # 18 of ViT-L; MAE, BEiT-v2: "cls" of the last block). Fine-tuning: the last block.
  c.model.pooling = "auto"
  c.model.block = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.data_dir = ""
  c.data.folder = ""
  c.data.shuffle_buffer = 16384
  c.data.workers = 16
  c.data.prefetch = 2
  c.data.synthetic_size = 1024
  c.data.max_consecutive_failures = 100  # undecodable images in a row: stop, naming the data
  c.data.crop_ratio = 0.875  # evaluation: resize to size / ratio, centre crop
  c.data.crop_scale = (0.08, 1.0)
  c.data.flip = True

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_train_images = config_lib.IMAGENET_TRAIN_IMAGES  # when no size is passed

  c.sharding = ml_collections.ConfigDict()
  c.sharding.mesh = (("data", -1), ("fsdp", 1))
  c.sharding.rules = ((".*", "replicate"),)
  return c


def _training(c, epochs, warmup):
  c.epochs = epochs
  c.num_steps = 0                 # > 0: exactly this many steps whatever the dataset (:smoke)
  c.log_every_steps = 100
  c.steps_in_flight = 2           # steps dispatched ahead of the devices (see config_lib)
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.optim = ml_collections.ConfigDict()
  c.optim.warmup_epochs = warmup
  c.optim.min_lr = 1e-6 if c.protocol == "finetune" else 0.0


def finetune_config(size: str = "base") -> ml_collections.ConfigDict:
  """BEiT/MAE end-to-end fine-tuning (Appendix A)."""
  base_lr, layer_decay, drop_path, epochs = FINETUNE_BY_SIZE[size]
  c = _common("finetune", size)
  c.model.pooling = "avg"       # global pooling + fc_norm, MAE's fine-tuning default
  c.model.drop_path = drop_path
  _training(c, epochs, 5.0)
  o = c.optim
  o.base_lr = base_lr
  o.layer_decay = layer_decay
  o.weight_decay = 0.05
  o.b1, o.b2 = 0.9, 0.999
  o.grad_clip_norm = 0.0        # MAE fine-tunes without clipping
  c.aug = ml_collections.ConfigDict(dict(
      randaug_ops=2, randaug_magnitude=9.0, randaug_magnitude_std=0.5,  # 'rand-m9-mstd0.5-inc1'
      reprob=0.25,                # random erasing, per-pixel normal noise
      mixup=0.8, cutmix=1.0,      # Beta(alpha) of mixup and of cutmix
      mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1))
  return c


def linear_probe_config(size: str = "base") -> ml_collections.ConfigDict:
  """MAE's linear probe: frozen encoder, BatchNorm(affine=False) + linear, LARS."""
  c = _common("linear_probe", size)
  c.batch_size = 16384
  _training(c, 90.0, 10.0)
  c.optim.base_lr = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.trust_coefficient = 0.001
  return c


def knn_config(size: str = "base") -> ml_collections.ConfigDict:
  """DINO's weighted k-NN on frozen, L2-normalised features."""
  c = _common("knn", size)
  c.batch_size = 1024           # feature extraction batch (train and validation)
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 20
  c.knn.temperature = 0.07
  return c


def quickstart(c) -> ml_collections.ConfigDict:
  """The embedded digits at the quickstart pretraining's model (tiny ViT, 32 px, patch 4)."""
  c.model.size = "tiny"
  c.model.patch_size = 4
  c.model.image_size = 32
  c.model.dtype = "float32"
  c.model.num_classes = 10
  c.data.source = "digits"
  c.data.train_split, c.data.eval_split = "train", "test"
  c.data.flip = False           # a mirrored digit is another symbol
  c.data.crop_scale = (0.5, 1.0)
  c.data.workers = 2
  c.init_dir = "/tmp/ddae_quickstart"
  c.batch_size = c.eval_batch_size = 64
  if c.protocol != "knn":
    c.epochs = {"finetune": 10.0, "linear_probe": 30.0}[c.protocol]
    c.optim.warmup_epochs = {"finetune": 1.0, "linear_probe": 3.0}[c.protocol]
    c.log_every_steps = 25
    c.eval_every_epochs = 10.0
    c.checkpoint_every_steps = 200
  if c.protocol == "linear_probe":
    # LARS steps are relative (lr x trust 1e-3 of |w|): keep ImageNet's peak
    # lr 6.4 (0.1 x 16384 / 256) at this batch, or the head barely moves.
    c.optim.base_lr = 6.4 * 256 / c.batch_size
  if c.protocol == "finetune":
    c.optim.base_lr = 4e-3
    c.aug.randaug_magnitude = 5.0  # 32 px digits lose their identity at m9
  return c


def _smoke(c):
  """One step at a small batch: checks a machine and a dataset, not accuracy.

  A fixed step count, as pretraining's :smoke, so that any dataset size gives
  a schedule with a step (epochs would round to none on a small one).
  """
  c.batch_size = c.eval_batch_size = 16
  if c.protocol != "knn":
    c.num_steps = 1
    c.optim.warmup_epochs = 0.0
    c.log_every_steps = 1


EVAL_VARIANTS = {"quickstart": quickstart, "smoke": _smoke}


def apply_variants(config, arg: str):
  """Applies comma-separated variants of the evaluation configs ("quickstart", "smoke")."""
  return config_lib.apply_variants(config, arg, EVAL_VARIANTS)


# ----------------------------------------------------------------- config files
BUILDERS = {"finetune": finetune_config, "linear_probe": linear_probe_config,
            "knn": knn_config}


def config_file(protocol: str, size: str, base_variant: str = ""):
  """The `get_config(arg)` of a config file: BUILDERS[protocol](size), then variants."""
  def get_config(arg: str = ""):
    config = apply_variants(BUILDERS[protocol](size), base_variant)
    return apply_variants(config, arg)
  return get_config


# ----------------------------------------------------------------------- checks
def _positive(config, field, integer=False):
  value = config
  for part in field.split("."):
    value = value[part]
  if value <= 0 or (integer and int(value) != value):
    fail(field, value, "an integer >= 1" if integer else "a value > 0")


def check(config, num_devices: int | None = None, require_init_dir: bool = False) -> None:
  """Validates an evaluation config; raises ConfigError naming field and allowed values."""
  one_of(config, "protocol", PROTOCOLS)
  one_of(config, "encoder", ENCODERS)
  one_of(config, "model.size", VIT_SIZES)
  one_of(config, "model.dtype", config_lib.DTYPES)
  one_of(config, "model.attention_impl", config_lib.EVAL_ATTENTION_IMPLS)
  one_of(config, "model.pooling", POOLINGS)
  one_of(config, "data.source", SOURCES)
  if require_init_dir and not config.init_dir:
    fail("init_dir", config.init_dir, "a pretraining workdir (--config.init_dir=DIR)")
  m = config.model
  depth = config_lib.encoder_dims(config)[1]
  block = m.get("block", 0)  # .get: configs written before the field existed
  if config.protocol == "finetune":
    if m.pooling == "auto":
      fail("model.pooling", m.pooling, "'avg' or 'cls' in fine-tuning")
    if block != 0:
      fail("model.block", block, "0 in fine-tuning (the classifier runs every block)")
  elif not (isinstance(block, int) and 0 <= block <= depth):
    fail("model.block", block, f"0 (the pretraining lineage's) or a block in [1, {depth}]")
  config_checks.check_patch_grid(m)
  if m.num_classes < 2:
    fail("model.num_classes", m.num_classes, "an integer >= 2")
  if not 0 < config.data.crop_ratio <= 1:
    fail("data.crop_ratio", config.data.crop_ratio, "a value in (0, 1]")
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    fail("data.crop_scale", tuple(config.data.crop_scale),
          "(low, high) with 0 < low <= high <= 1")
  for field in ("batch_size", "eval_batch_size"):
    _positive(config, field, integer=True)
    if num_devices is not None and config[field] % num_devices:
      fail(field, config[field], f"a multiple of the {num_devices} devices")
  if config.protocol == "knn":
    _positive(config, "knn.k", integer=True)
    _positive(config, "knn.temperature")
  else:
    _check_training(config)
  axes = dict(config.sharding.mesh)
  if set(axes) != {"data", "fsdp"}:
    fail("sharding.mesh", config.sharding.mesh, "axes ('data', n) and ('fsdp', n)")


def _check_training(config):
  for field in ("epochs", "optim.base_lr", "eval_every_epochs"):
    _positive(config, field)
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _positive(config, field, integer=True)
  o = config.optim
  if not 0 <= o.warmup_epochs < config.epochs:
    fail("optim.warmup_epochs", o.warmup_epochs, f"a value in [0, epochs = {config.epochs}): "
         "the cosine decay after the warm-up needs at least one step")
  if o.weight_decay < 0:
    fail("optim.weight_decay", o.weight_decay, "a value >= 0")
  if config.protocol == "linear_probe":
    if not 0 <= o.momentum < 1:
      fail("optim.momentum", o.momentum, "a value in [0, 1)")
    return
  if not 0 < o.layer_decay <= 1:
    fail("optim.layer_decay", o.layer_decay, "a value in (0, 1]")
  if not 0 <= config.model.drop_path < 1:
    fail("model.drop_path", config.model.drop_path, "a value in [0, 1)")
  a = config.aug
  if not 0 <= a.randaug_magnitude <= 10:
    fail("aug.randaug_magnitude", a.randaug_magnitude, "a value in [0, 10] (timm's levels)")
  if a.randaug_ops < 0:
    fail("aug.randaug_ops", a.randaug_ops, "an integer >= 0")
  for field in ("reprob", "mix_prob", "switch_prob", "label_smoothing"):
    if not 0 <= a[field] <= 1:
      fail(f"aug.{field}", a[field], "a value in [0, 1]")
  for field in ("mixup", "cutmix"):
    if a[field] < 0:
      fail(f"aug.{field}", a[field], "a value >= 0 (0 disables)")
  if (a.mixup > 0 or a.cutmix > 0) and config.batch_size % 2:
    fail("batch_size", config.batch_size, "an even number (mixup pairs the batch reversed)")


def config_file_check(config) -> None:
  """What tests/test_config.py runs on every eval config file and variant."""
  check(config, num_devices=8)
  if config.protocol != "knn":  # k-NN has no schedule
    config_lib.check_steps(config)
