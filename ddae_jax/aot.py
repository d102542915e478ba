r"""Compiles the real train step for a TPU slice on any machine; one JSON line per compile.

  pip install -e '.[tpu]'   # libtpu: the TPU compiler, usable without a TPU
  python -m ddae_jax.aot --config=configs/vitb.py --topology=v4-64
  python -m ddae_jax.aot --config=configs/vitl.py --topology=v4-128 --sweep
  python -m ddae_jax.aot --config=configs/finetune_vitb.py --binary=finetune --topology=v5e-64
  python -m ddae_jax.aot --config=configs/vitb.py --topology=v5e-64 --block=pixel_decoder

The library: ddae_jax/perf/aot.py.
"""

from absl import app, flags

from ddae_jax.perf import aot

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(aot.main)
