r"""Fine-tunes a pretrained encoder end to end (the BEiT/MAE protocol of Appendix A).

  python -m ddae_jax.finetune --config=configs/finetune_vitb.py \
      --config.init_dir=gs://BUCKET/ddae_vitb_ep100 --workdir=gs://BUCKET/ft_vitb
  python -m ddae_jax.finetune --config=configs/finetune_quickstart.py \
      --config.init_dir=/tmp/ddae_quickstart --workdir=/tmp/ddae_quickstart_ft

AdamW with layer-wise lr decay, drop path, RandAugment, random erasing,
mixup/cutmix with label smoothing; evaluation on centre crops. Rerunning the
command resumes from the workdir's latest checkpoint.
The library: ddae_jax/evaluation/finetune.py.
"""

from ddae_jax import cli
from ddae_jax.evaluation import finetune

if __name__ == "__main__":
  cli.run_evaluation(finetune.train_and_evaluate, "Fine-tuning config file.")
