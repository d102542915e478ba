r"""DDAE ViT-S/16 pretraining on ImageNet-1K (the ablations' backbone, Tables 3, 6, 7).

  python -m ddae_jax.main --config=configs/vits.py --workdir=gs://BUCKET/ddae_vits_ep100

Variants: :ep800, :smoke, :fsdp (see configs/vitb.py).
"""

from ddae_jax import config_lib


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "small"
  return config_lib.apply_variants(config, arg)
