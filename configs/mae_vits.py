r"""MAE ViT-S/16, 100 epochs: the backbone of Table 3 (and Tables 6, 7) with its DDS rows.

  python -m ddae_jax.main --config=configs/mae_vits.py:dds_mae --workdir=gs://BUCKET/dds_mae_vits

The default is MAE itself (random masking at 75%, an 8 x 512 decoder,
normalised-pixel loss, no momentum encoder), on DDAE's 100-epoch schedule.
Variants (ddae_jax/ablations.py): :mae, :d_mae, :ds_mae, :dds_mae (Table 3);
:dds_mae,k1 ... :dds_mae,k6 (Table 6); :dds_mae,beta_fixed_0 ... (Table 7);
plus :ep800, :smoke, :fsdp. `python -m ddae_jax.sweep --table=table3` prints
every row's command.
"""

from ddae_jax import ablations, config_lib

VARIANTS = (*config_lib.VARIANTS, "mae", "d_mae", "ds_mae", "dds_mae", "ep300",
            "k1", "k2", "k4", "k6", "beta_fixed_0", "beta_fixed_m05", "beta_learn_0",
            "beta_learn_m01_m07", "beta_learn_m07_m01", "beta_learn_m05")


def get_config(arg: str = ""):
  config = config_lib.base_config()
  config.model.size = "small"
  ablations.VARIANTS["mae"](config)
  return config_lib.apply_variants(config, arg)
