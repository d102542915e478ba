#!/usr/bin/env bash
# BENCHMARKS.md "GPU": the pretraining step on one GPU, four configs, one JSON line each
# (python -m ddae_jax.bench: 5 warm-up steps, 30 timed), written to ${OUT:-.}/gpu_bench.jsonl.
#
#   bash launch/gpu_benchmarks.sh [SECONDS_PER_CONFIG] [EXTRA FLAGS...]
#
# EXTRA FLAGS go to every run (e.g. --config.model.attention_impl=xla).
set -uo pipefail
out=${OUT:-.}
limit=${1:-170}
shift || true
extra=("$@")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "${out}/gpu.txt" 2>&1
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" >> "${out}/gpu.txt" 2>&1
configs=(
  "configs/vitb.py --config.batch_size=256 --config.dds.deep_supervision=False --config.dds.dynamic=False --config.distill.enabled=False --config.pixel.decoder_depth=8 --config.masking.kind=random"
  "configs/vitb.py --config.batch_size=256"
  "configs/vits.py --config.batch_size=256"
  "configs/vitl.py --config.batch_size=128"
)
for cfg in "${configs[@]}"; do
  # shellcheck disable=SC2086  # the config and its overrides are separate arguments
  timeout "${limit}" python3 -m ddae_jax.bench --config=${cfg} "${extra[@]}" --steps=30 --warmup=5 \
    2>> "${out}/bench_stderr.txt" | tee -a "${out}/gpu_bench.jsonl"
  echo "{\"config\": \"${cfg}\", \"exit\": $?}" >> "${out}/gpu_bench.jsonl"
done
