"""Every config and variant loads; bad values fail early and name the field."""

import os

import pytest
from helpers import config_variants, load
from repo_paths import REPO

from ddae_jax import config_checks, config_lib
from ddae_jax import train_step as ts


def _check_pretraining(config):
  config_checks.validate(config, num_devices=8)
  config_lib.check_steps(config)  # the schedule has steps and a decay after its warm-up
  assert config_lib.total_steps(config) >= 1


def _config_cases():
  """(path, variant, check) for every config file and each of its variants.

  A config module may name its own `VARIANTS` (default: the pretraining
  ones) and a `check(config)` that validates a loaded config (default:
  the pretraining validation).
  """
  for path, variant, module, name in config_variants():
    yield pytest.param(path, variant, module.get("check", _check_pretraining), id=name)


@pytest.mark.parametrize("path,variant,check", list(_config_cases()))
def test_every_config_and_variant_loads_and_validates(path, variant, check):
  check(load(path, variant))


def test_paper_defaults():
  c = load(os.path.join(REPO, "configs", "vitb.py"))
  assert config_lib.supervised_blocks(c) == (3, 6, 9, 12)
  assert config_lib.block_weights(c) == (0.75, 0.75, 0.75, 1.0)
  assert list(config_lib.beta_init(c)) == [-0.5] * 4
  assert c.dds.reg_weight == 0.5 and c.masking.kind == "blockwise"
  assert c.masking.ratio == 0.75 and c.batch_size == 4096 and c.optim.weight_decay == 0.05
  assert config_lib.learning_rate(c) == pytest.approx(1.5e-4 * 16)
  assert (c.pixel.decoder_width, c.pixel.decoder_depth, c.distill.decoder_depth) == (512, 2, 2)
  e800 = load(os.path.join(REPO, "configs", "vitb.py"), "ep800")
  assert (e800.epochs, e800.optim.warmup_epochs) == (800, 40)
  # Appendix A: momentum 0.999 -> 0.99999 over the first 400 epochs (BootMAE's schedule).
  from ddae_jax.methods import schedules
  per_epoch = e800.num_train_images / e800.batch_size
  steps = config_lib.steps(e800)
  momentum = lambda epoch: float(schedules.ema_momentum(e800, int(epoch * per_epoch) + 1, steps))
  assert momentum(0) == pytest.approx(0.999) and momentum(100) == pytest.approx(0.9999)
  assert momentum(400) == pytest.approx(0.99999) and momentum(700) == pytest.approx(0.99999)
  assert momentum(399) < 0.99999
  c.dds.num_supervised = 6
  assert config_lib.supervised_blocks(c) == (2, 4, 6, 8, 10, 12)
  c.dds.num_supervised = 2
  assert config_lib.supervised_blocks(c) == (6, 12)
  vitl = load(os.path.join(REPO, "configs", "vitl.py"))
  assert config_lib.supervised_blocks(vitl) == (6, 12, 18, 24)


@pytest.mark.parametrize("field,value,allowed", [
    ("masking.ratio", 1.0, "(0, 1)"),
    ("masking.ratio", 0.0, "(0, 1)"),
    ("masking.ratio", -0.2, "(0, 1)"),
    ("masking.kind", "grid", "blockwise"),
    ("model.image_size", 225, "multiple of model.patch_size"),
    ("model.size", "huge", "base"),
    ("model.dtype", "float8", "bfloat16"),
    ("model.pos_embed", "rope", "learned"),
    ("dds.blocks", (3, 13), "[1, 12]"),
    ("dds.blocks", (0, 12), "[1, 12]"),
    ("dds.blocks", (6, 3), "increasing"),
    ("dds.num_supervised", 5, "divisor"),
    ("dds.block_weights", (1.0, 1.0), "4 values"),
    ("dds.beta_init", (0.0, 0.1), "one value or 4 values"),
    ("dds.normalizer", "sum", "num_masked"),
    ("distill.target_norm", "l2", "layernorm"),
    ("ema.momentum_end", 1.0, "[0, 1)"),
    ("ema.momentum_start", 0.9999999, "[0, ema.momentum_end"),
    ("optim.b2", 1.0, "[0, 1)"),
    ("optim.warmup_epochs", 500.0, "[0, epochs"),
    ("batch_size", 4095, "multiple of the data-parallel size 8"),
    ("sharding.rules", ((".*", "shard"),), "'replicate' or 'fsdp'"),
    ("sharding.mesh", (("data", 3), ("fsdp", -1)), "divides the 8 devices"),
])
def test_bad_config_names_field_and_allowed_values(field, value, allowed):
  c = load(os.path.join(REPO, "configs", "vitb.py"))
  section = c
  *parents, name = field.split(".")
  for p in parents:
    section = section[p]
  section[name] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_checks.validate(c, num_devices=8)
  message = str(err.value)
  assert f"config.{field}" in message and allowed in message, message


def test_bad_config_fails_before_any_compute(monkeypatch):
  """build() validates before it makes a mesh or traces anything."""
  c = load(os.path.join(REPO, "configs", "tiny.py"))
  c.model.image_size = 30
  called = []
  monkeypatch.setattr(ts, "create_train_state", lambda *a: called.append(1))
  with pytest.raises(config_lib.ConfigError, match="config.model.image_size"):
    ts.build(c)
  assert not called


def test_unknown_variant_is_named():
  with pytest.raises(config_lib.ConfigError, match="'ep900'.*allowed"):
    load(os.path.join(REPO, "configs", "vitb.py"), "ep900")


@pytest.mark.parametrize("builder", ["pretraining", "finetune", "linear_probe"])
def test_a_schedule_without_decay_steps_names_epochs_and_warmup(builder):
  from ddae_jax import optim
  from ddae_jax.evaluation import config as eval_config
  if builder == "pretraining":
    c = load(os.path.join(REPO, "configs", "quickstart.py"))
  else:
    c = eval_config.quickstart(eval_config.BUILDERS[builder]("tiny"))
  c.batch_size, c.optim.warmup_epochs = 64, 1.0
  c.epochs = 1.004  # validate passes (warm-up < epochs); in steps both are 23 over 1,497 images
  with pytest.raises(config_lib.ConfigError) as err:  # where a run resolves its steps
    config_lib.check_steps(c, 1497)
  message = str(err.value)
  assert "\n" not in message
  assert ("config.optim.warmup_epochs = 1.0 (23 steps) is not shorter than config.epochs = "
          "1.004 (23 steps over 1,497 images at batch 64)") in message
  c.epochs = 1.05  # 25 steps: two of cosine decay
  assert float(optim.lr_schedule(c, config_lib.steps(c, 1497))(24)) > 0
  c.epochs, c.optim.warmup_epochs = 0.01, 0.0
  with pytest.raises(config_lib.ConfigError, match=r"config.epochs = 0.01 is invalid: allowed "
                     r"at least 0.0214 \(one step over 1,497 images at batch 64\); 0.01 epochs "
                     r"round to 0 steps"):
    config_lib.check_steps(c, 1497)


def test_a_fixed_number_of_steps_shorter_than_the_warm_up_is_refused():
  c = load(os.path.join(REPO, "configs", "vitb.py"), "smoke")
  c.optim.warmup_epochs = 0.001  # 160 steps of ImageNet at batch 8 > num_steps = 20
  with pytest.raises(config_lib.ConfigError, match=r"warmup_epochs = 0.001 \(160 steps\) is not "
                     r"shorter than config.num_steps = 20: .* raise config.num_steps or lower"):
    config_lib.resolve(c, "cpu", 1_281_167)  # pretraining's one resolution checks
