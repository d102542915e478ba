r"""Pretrains DDAE.

  python -m ddae_jax.main --config=configs/vitb.py --workdir=gs://BUCKET/run
  python -m ddae_jax.main --config=configs/quickstart.py --workdir=/tmp/ddae_quickstart

Rerunning the same command resumes from the workdir's latest checkpoint.
Fields are overridden on the command line: --config.batch_size=1024.
Several processes (TPU pods, SLURM, or by hand with --coordinator_address,
--num_processes, --process_id) form one run through jax.distributed.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (local or gs://).")
flags.DEFINE_string("init_dir", None, "Start from another run's latest checkpoint when "
                    "the workdir has none.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _maybe_initialize_distributed():
  import jax
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif (any(os.environ.get(v) for v in _CLUSTER_ENV)
        and int(os.environ.get("SLURM_NTASKS", "2")) > 1):
    jax.distributed.initialize()  # the cluster's environment says who is who


def main(argv):
  del argv
  _maybe_initialize_distributed()
  import jax
  from ddae_jax import checkpoints, config_lib, train
  from ddae_jax.data.sources import DatasetMissing, InputUnreadable
  logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.init_dir)
  except (DatasetMissing, config_lib.ConfigError, checkpoints.CheckpointMissing,
          checkpoints.CheckpointDamaged, InputUnreadable, train.NonFiniteLoss) as err:
    # The user's setup, not a bug: the message is the whole story.
    raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
  app.run(main)
