r"""A tiny DDAE (ViT width 64, depth 4, 32 px images, patch 4) for tests and the CPU.

  python -m ddae_jax.main --config=configs/tiny.py --workdir=/tmp/ddae_tiny

K = 4 supervised blocks of 4 gives blocks 1, 2, 3, 4.
"""

from ddae_jax import config_lib


def get_config(arg: str = ""):
  config = config_lib.tiny_config()
  return config_lib.apply_variants(config, arg)
