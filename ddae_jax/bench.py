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

import json

from absl import app, flags
from ml_collections import config_flags

from ddae_jax import cli
from ddae_jax.perf import bench

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps.")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_string("sweep", "", "Comma-separated batch sizes; reports the largest that fits.")


def main(argv):
  del argv
  config = FLAGS.config
  if not FLAGS.sweep:
    print(json.dumps(bench.run_once(config, FLAGS.steps, FLAGS.warmup)), flush=True)
    return
  largest = None
  for batch in sorted(int(b) for b in FLAGS.sweep.split(",")):
    with config.unlocked():
      config.batch_size = batch
    try:
      print(json.dumps(bench.run_once(config, FLAGS.steps, FLAGS.warmup)), flush=True)
      largest = batch
    except Exception as err:  # noqa: BLE001 - only out-of-memory ends a sweep quietly
      if not bench.is_oom(err):
        raise
      print(json.dumps({"batch": batch, "fits": False}), flush=True)
      break
  print(json.dumps({"largest_batch_that_fits": largest}), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli.exits_on_user_errors(main))
