r"""MAE ViT-B/16 and DDS-MAE ViT-B/16: Table 2's one-stage rows.

  python -m ddae_jax.main --config=configs/mae_vitb.py:mae,ep300 --workdir=gs://BUCKET/mae_vitb
  python -m ddae_jax.main --config=configs/mae_vitb.py:dds_mae --workdir=gs://BUCKET/dds_mae_vitb

The default is MAE (random masking at 75%, 8 x 512 decoder, normalised-pixel
loss, no momentum encoder) for 100 epochs; :ep300 is Table 2's MAE schedule,
:dds_mae adds deep dynamic supervision through MAE's own decoder.
"""

from ddae_jax import ablations, config_lib

VARIANTS = (*config_lib.VARIANTS, "mae", "d_mae", "ds_mae", "dds_mae", "ep300")


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "base"
  ablations.VARIANTS["mae"](config)
  return config_lib.apply_variants(config, arg)
