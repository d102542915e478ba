#!/usr/bin/env bash
# The beta study of README "Beta over training": the quickstart (embedded digits,
# no download) under both normalisers of eq. 3/5 and the four learnable
# initialisations of Table 7 / Fig. 6, then one figure per normaliser.
#
#   bash launch/beta_study.sh [ROOT] [EPOCHS] [BETA_LR_SCALE] [BATCH]
#
# beta's learning rate is scaled (default 100x the model's) so that it can
# settle within a CPU-sized run of small batches; the rest is the quickstart's.
set -euo pipefail
root=${1:-/tmp/ddae_beta_study}
epochs=${2:-4}
scale=${3:-100}
batch=${4:-32}
inits=(beta_learn_m05 beta_learn_0 beta_learn_m01_m07 beta_learn_m07_m01)
for normalizer in weight_sum num_masked; do
  for init in "${inits[@]}"; do
    python -m ddae_jax.main "--config=configs/quickstart.py:${init}" \
      "--workdir=${root}/${normalizer}/${init}" \
      "--config.dds.normalizer=${normalizer}" "--config.epochs=${epochs}" \
      "--config.optim.beta_lr_scale=${scale}" "--config.batch_size=${batch}" \
      --config.optim.warmup_epochs=0.5 --config.log_every_steps=5 \
      --config.checkpoint_every_steps=100000
  done
  args=()
  for init in "${inits[@]}"; do
    args+=("--workdir=${root}/${normalizer}/${init}" "--label=${init#beta_learn_}")
  done
  python -m ddae_jax.analyze beta "${args[@]}" --x=epoch "--out=${root}/${normalizer}"
done
