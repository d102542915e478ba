r"""Quickstart knn on the embedded digits, from the quickstart pretraining run.

  python -m ddae_jax.main --config=configs/quickstart.py --workdir=/tmp/ddae_quickstart
  python -m ddae_jax.knn --config=configs/knn_quickstart.py \
      --config.init_dir=/tmp/ddae_quickstart --workdir=/tmp/ddae_quickstart_knn

Add --config.random_init=True for the randomly initialised baseline.
"""

from ddae_jax.evaluation import config as eval_config

VARIANTS, check = ("smoke",), eval_config.config_file_check
get_config = eval_config.config_file("knn", "tiny", base_variant="quickstart")
