r"""Times the jitted train step on synthetic on-device data; one JSON line per run.

  python -m ddae_jax.bench --config=configs/vitb.py --config.batch_size=256
  python -m ddae_jax.bench --config=configs/vitb.py --sweep=128,256,512,1024

Each run compiles the step, runs `--warmup` steps, then times `--steps` steps
two ways: one by one with the device synchronised after each (median and
spread of the step time), and back to back with one synchronisation at the end
(the throughput a training loop sees, reported as images/s). FLOPs are the
analytic model FLOPs of ddae_jax/perf/flops.py; MFU divides by the chip's dense bf16
peak. Imports no tensorflow.
The library: ddae_jax/perf/bench.py.
"""

from absl import app, flags

from ddae_jax import cli
from ddae_jax.perf import bench

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli.exits_on_user_errors(bench.main))
