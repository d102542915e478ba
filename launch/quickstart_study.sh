#!/usr/bin/env bash
# README "Quickstart figures" and "Watching a run": the quickstart (embedded
# digits, no download) as DDAE and as an MAE-style run (`:mae` with a 2-block
# 32-wide pixel decoder), SEEDS seeds each, k-NN top-1 on the 300 held-out
# digits every 2 epochs (config.evals.knn; the default is every 10 / 3); one DDAE
# run with the evaluator off; then the evaluation table on seed 0 of each: k-NN by both
# readouts, linear probe, fine-tuning, against a random encoder, evaluation
# seeds 0 and 1; then the figures.
#
#   bash launch/quickstart_study.sh [ROOT] [SEEDS] [EPOCHS]
set -euo pipefail
root=${1:-/tmp/ddae_quickstart_study}
seeds=${2:-3}
epochs=${3:-10}
mae=(--config.pixel.decoder_width=32 --config.pixel.decoder_depth=2
     --config.pixel.decoder_heads=4)
for ((seed = 0; seed < seeds; seed++)); do
  python -m ddae_jax.main --config=configs/quickstart.py "--workdir=${root}/ddae_s${seed}" \
    "--config.seed=${seed}" "--config.epochs=${epochs}" --config.evals.knn.every_epochs=2
  python -m ddae_jax.main --config=configs/quickstart.py:mae "--workdir=${root}/mae_s${seed}" \
    "--config.seed=${seed}" "--config.epochs=${epochs}" --config.evals.knn.every_epochs=2 \
    "${mae[@]}"
done
python -m ddae_jax.main --config=configs/quickstart.py "--workdir=${root}/ddae_noeval" \
  --config.seed=0 "--config.epochs=${epochs}" --config.evals.knn.every_epochs=0
for seed in 0 1; do
  for run in ddae mae random; do
    if [[ ${run} == random ]]; then init=(--config.random_init=True); else
      init=("--config.init_dir=${root}/${run}_s0"); fi
    for pooling in avg cls; do
      python -m ddae_jax.knn --config=configs/knn_quickstart.py "${init[@]}" \
        "--config.model.pooling=${pooling}" "--config.seed=${seed}" \
        "--workdir=${root}/eval/knn_${run}_${pooling}_s${seed}"
    done
    python -m ddae_jax.linear_probe --config=configs/linear_probe_quickstart.py "${init[@]}" \
      "--config.seed=${seed}" "--workdir=${root}/eval/lin_${run}_s${seed}"
    python -m ddae_jax.finetune --config=configs/finetune_quickstart.py "${init[@]}" \
      "--config.seed=${seed}" "--workdir=${root}/eval/ft_${run}_s${seed}"
  done
done
runs=()
for ((seed = 0; seed < seeds; seed++)); do
  runs+=("--workdir=${root}/ddae_s${seed}" --label=DDAE)
done
for ((seed = 0; seed < seeds; seed++)); do
  runs+=("--workdir=${root}/mae_s${seed}" --label=MAE-style)
done
python -m ddae_jax.analyze evals "${runs[@]}" "--out=${root}/figures"
