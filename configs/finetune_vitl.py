r"""ViT-L/16 fine-tuning on ImageNet-1K (MAE's recipe: 50 epochs, layer decay 0.75,
base lr 1e-3, drop path 0.2).

  python -m ddae_jax.finetune --config=configs/finetune_vitl.py \
      --config.init_dir=gs://BUCKET/ddae_run --workdir=gs://BUCKET/finetune_run

Variants: :quickstart (the embedded digits at the quickstart model), :smoke.
Defaults and their sources: ddae_jax/evaluation/config.py.
"""

from ddae_jax.evaluation import config as eval_config

VARIANTS, check = tuple(eval_config.EVAL_VARIANTS), eval_config.config_file_check
get_config = eval_config.config_file("finetune", "large")
