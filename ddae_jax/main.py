r"""Pretrains DDAE.

  python -m ddae_jax.main --config=configs/vitb.py --workdir=gs://BUCKET/run
  python -m ddae_jax.main --config=configs/quickstart.py --workdir=/tmp/ddae_quickstart

Rerunning the same command resumes from the workdir's latest checkpoint.
Fields are overridden on the command line: --config.batch_size=1024.
Several processes (TPU pods, SLURM, or by hand with --coordinator_address,
--num_processes, --process_id) form one run through jax.distributed.
The library: ddae_jax/train.py.
"""

import logging

from ddae_jax import cli


def main():
  import jax

  from ddae_jax import train
  logging.info("JAX process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.train_and_evaluate(cli.FLAGS.config, cli.FLAGS.workdir, cli.FLAGS.init_dir)


if __name__ == "__main__":
  cli.run(main, "Pretraining config file.")
