"""evaluation/config.py: the protocols' configs carry the paper's settings; bad fields are named."""

import pytest


def test_eval_configs_carry_the_papers_settings_and_name_bad_fields():
  from ddae_jax import config_lib
  from ddae_jax.evaluation import config as eval_config
  load = lambda name: eval_config.config_file(*name)()
  vitb, vits, vitl = (load(("finetune", s)) for s in ("base", "small", "large"))
  assert config_lib.learning_rate(vitb) == pytest.approx(8e-3)   # Appendix A, batch 1024
  assert config_lib.learning_rate(vits) == pytest.approx(1.6e-2)
  assert (vitb.optim.layer_decay, vits.optim.layer_decay, vitl.optim.layer_decay) == (
      0.65, 0.75, 0.75)
  assert (vitb.epochs, vitl.epochs, vitb.model.drop_path, vitl.model.drop_path) == (
      100, 50, 0.1, 0.2)
  assert (vitb.batch_size, vitb.optim.warmup_epochs, vitb.optim.weight_decay) == (1024, 5, 0.05)
  a = vitb.aug
  assert (a.mixup, a.cutmix, a.label_smoothing, a.reprob, a.randaug_magnitude) == (
      0.8, 1.0, 0.1, 0.25, 9)
  lin = load(("linear_probe", "base"))
  assert (lin.batch_size, lin.epochs, lin.optim.warmup_epochs, lin.optim.base_lr,
          lin.optim.momentum, lin.optim.weight_decay) == (16384, 90, 10, 0.1, 0.9, 0.0)
  knn = load(("knn", "base"))
  assert (knn.knn.k, knn.knn.temperature) == (20, 0.07)
  vitb.model.pooling = "max"
  with pytest.raises(eval_config.ConfigError, match=r"config.model.pooling.*'avg', 'cls'"):
    eval_config.check(vitb)
  vitb.model.pooling, vitb.optim.layer_decay = "avg", 1.5
  with pytest.raises(eval_config.ConfigError, match=r"config.optim.layer_decay.*\(0, 1\]"):
    eval_config.check(vitb)
  with pytest.raises(eval_config.ConfigError, match="config.init_dir"):
    eval_config.check(lin, require_init_dir=True)
