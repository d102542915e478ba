r"""ViT-B/16 weighted k-NN (k = 20, T = 0.07, cosine) on ImageNet-1K, frozen features.

  python -m ddae_jax.knn --config=configs/knn_vitb.py \
      --config.init_dir=gs://BUCKET/ddae_run --workdir=gs://BUCKET/knn_run

Variants: :quickstart (the embedded digits at the quickstart model), :smoke.
Defaults and their sources: ddae_jax/evaluation/config.py.
"""

from ddae_jax.evaluation import config as eval_config

VARIANTS, check = tuple(eval_config.EVAL_VARIANTS), eval_config.config_file_check
get_config = eval_config.config_file("knn", "base")
