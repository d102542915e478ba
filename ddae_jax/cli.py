"""What the binaries share: absl flags, jax.distributed start-up, user errors as exits.

A binary calls `run(fn, config_help)` (pretraining) or `run_evaluation(fn,
config_help)`; the flags are defined then, so importing a binary's library
defines none and several binaries' libraries import side by side.
"""

import inspect
import os

from absl import app, flags

FLAGS = flags.FLAGS
_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def define_flags(config_help: str) -> None:
  """--config, --workdir, --init_dir and the multi-process flags."""
  from ml_collections import config_flags

  from ddae_jax import cluster
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (local or gs://).")
  flags.DEFINE_string("init_dir", None, "Start from another run's latest checkpoint when "
                      "the workdir has none.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("heartbeat_timeout", cluster.DEFAULT_HEARTBEAT_TIMEOUT_S,
                       "Multi-process runs: seconds without a process's heartbeat after "
                       "which JAX's coordination service ends every other process with an "
                       "error naming it (JAX's default; needs jax >= 0.7 to change).",
                       lower_bound=1)
  flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """jax.distributed from the flags, or from a cluster's environment (SLURM, TPU pods)."""
  import jax
  if FLAGS.coordinator_address:
    args = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif (any(os.environ.get(v) for v in _CLUSTER_ENV)
        and int(os.environ.get("SLURM_NTASKS", "2")) > 1):
    args = ()  # the cluster's environment says who is who
  else:
    return
  jax.distributed.initialize(
      *args, **heartbeat_option(jax.distributed.initialize, FLAGS.heartbeat_timeout))


def heartbeat_option(initialize, seconds: int) -> dict:
  """{"heartbeat_timeout_seconds": seconds} where `initialize` takes it (jax >= 0.7)."""
  from ddae_jax import cluster
  if "heartbeat_timeout_seconds" in inspect.signature(initialize).parameters:
    return {"heartbeat_timeout_seconds": seconds}
  if seconds != cluster.DEFAULT_HEARTBEAT_TIMEOUT_S:
    raise SystemExit(f"error: --heartbeat_timeout={seconds} needs jax >= 0.7 (this jax has a "
                     f"fixed {cluster.DEFAULT_HEARTBEAT_TIMEOUT_S} s); upgrade jax or drop the "
                     "flag.")
  return {}


def user_errors() -> tuple[type[Exception], ...]:
  """Errors of the user's setup, not bugs: their message is the whole story."""
  from ddae_jax import cluster, config_lib, runtime
  from ddae_jax.data.sources import DatasetMissing, InputUnreadable
  from ddae_jax.weights import checkpoints, pretrained
  return (DatasetMissing, InputUnreadable, config_lib.ConfigError,
          checkpoints.CheckpointMissing, checkpoints.CheckpointDamaged,
          pretrained.CheckpointMismatch, runtime.NonFiniteLoss, cluster.ProcessLost)


def exits_on_user_errors(fn):
  """`fn` whose user errors (`user_errors`) end the process with their one-line message."""
  def wrapped(*args, **kwargs):
    errors = user_errors()
    try:
      return fn(*args, **kwargs)
    except errors as err:
      raise SystemExit(f"error: {err}") from None
  return wrapped


def run(fn, config_help: str) -> None:
  """absl main: defines the flags, starts jax.distributed, calls fn(); user errors exit 1."""
  define_flags(config_help)

  def main(argv):
    del argv
    initialize_distributed()
    exits_on_user_errors(fn)()

  app.run(main)


def run_evaluation(fn, config_help: str) -> None:
  """`run` for an evaluation binary: fn(config, workdir), --init_dir over config.init_dir."""
  def main():
    import jax

    from ddae_jax.evaluation import config as eval_config
    config = FLAGS.config
    if FLAGS.init_dir:
      with config.unlocked():
        config.init_dir = FLAGS.init_dir
    eval_config.check(config, num_devices=jax.device_count(),
                      require_init_dir=not config.random_init)
    fn(config, FLAGS.workdir)

  run(main, config_help)
