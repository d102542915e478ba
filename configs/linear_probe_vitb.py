r"""ViT-B/16 linear probe on ImageNet-1K: LARS, base lr 0.1, batch 16384, 90 epochs (Appendix A).

  python -m ddae_jax.linear_probe --config=configs/linear_probe_vitb.py \
      --config.init_dir=gs://BUCKET/ddae_run --workdir=gs://BUCKET/linear_probe_run

Variants: :quickstart (the embedded digits at the quickstart model), :smoke.
Defaults and their sources: ddae_jax/evaluation/config.py.
"""

from ddae_jax.evaluation import config as eval_config

VARIANTS, check = tuple(eval_config.EVAL_VARIANTS), eval_config.config_file_check
get_config = eval_config.config_file("linear_probe", "base")
