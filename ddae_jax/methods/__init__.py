"""Pretraining methods: DDAE (and the MAE rows) and BEiT-v2, behind one interface (base.Method)."""

from ddae_jax.methods.base import Method, make_encoder  # noqa: F401 (the interface)
from ddae_jax.methods.beitv2 import BEiTv2
from ddae_jax.methods.ddae import DDAE


def make(config, derived) -> Method:
  """The method of config.method, built from the run's resolved values (config_lib.Derived)."""
  return BEiTv2(config, derived) if config.method == "beitv2" else DDAE(config, derived)
