r"""DDAE ViT-L/16 pretraining on ImageNet-1K, parameters split FSDP-style by default.

  python -m ddae_jax.main --config=configs/vitl.py --workdir=gs://BUCKET/ddae_vitl_ep100

K = 4 supervised blocks of 24 gives blocks 6, 12, 18, 24.
Variants: :ep800, :smoke (see configs/vitb.py).
"""

from ddae_jax import config_lib


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "large"
  config.model.remat = True
  config.sharding.mesh = (("data", 1), ("fsdp", -1))
  config.sharding.rules = ((".*", "fsdp"),)
  return config_lib.apply_variants(config, arg)
