r"""DDAE ViT-B/16 pretraining on ImageNet-1K: the paper's main setting.

  python -m ddae_jax.main --config=configs/vitb.py --workdir=gs://BUCKET/ddae_vitb_ep100

Variants on the argument (combine with commas):
  configs/vitb.py:ep800   800 epochs, 40 warm-up, momentum ramp over 400 (Table 1)
  configs/vitb.py:smoke   20 steps of batch 8, each logged, whatever the data: checks a machine
  configs/vitb.py:fsdp    parameters and optimizer state split over all devices
  configs/vitb.py:dds_none, :dds_pixel, :dds_distill, :dds_both   Table 4's rows
Any field can be overridden: --config.batch_size=1024 --config.dds.num_supervised=6
"""

from ddae_jax import config_lib

VARIANTS = (*config_lib.VARIANTS, "dds_none", "dds_pixel", "dds_distill", "dds_both")


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "base"
  return config_lib.apply_variants(config, arg)
