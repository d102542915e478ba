r"""Times the jitted train step on synthetic on-device data; one JSON line per run.

  python -m ddae_jax.bench --config=configs/vitb.py --config.batch_size=256
  python -m ddae_jax.bench --config=configs/vitb.py --sweep=128,256,512,1024

The library: ddae_jax/perf/bench.py.
"""

from absl import app, flags

from ddae_jax.perf import bench

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(bench.main)
