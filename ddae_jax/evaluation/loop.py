"""The training loop fine-tuning and linear probing share: resume, step, log, evaluate, save.

Resume order: this workdir's latest checkpoint, else a fresh state (whose
encoder came from the pretraining run). A checkpoint holds the protocol's
train state and every process's input position, so a resumed run sees the
same augmented batches it would have seen. A preemption (runtime.StopDecision:
SIGTERM on one process, JAX's sync point on several, also polled between
evaluation batches) saves and stops; rerunning the command resumes.
"""

from __future__ import annotations

import logging

import jax
from etils import epath

from ddae_jax import config_lib, metrics, runtime, sharding
from ddae_jax.data import pipeline, sources
from ddae_jax.evaluation import config as eval_config
from ddae_jax.evaluation import input_pipeline, scoring
from ddae_jax.weights import checkpoints


def setup(config, devices=None):
  """Validates the config, makes the mesh.

  Returns:
    (mesh, the batch sharding).
  """
  devices = list(jax.devices() if devices is None else devices)
  eval_config.check(config, num_devices=len(devices), require_init_dir=not config.random_init)
  mesh = sharding.make_mesh(config.sharding.mesh, devices)
  return mesh, sharding.batch_sharding(mesh)


def resolve_steps(config, num_images: int | None = None) -> config_lib.Steps:
  """A protocol's step arithmetic over `num_images` (None: config.num_train_images), once
  per run; a ConfigError naming epochs and warmup_epochs where they make no schedule."""
  config_lib.check_steps(config, num_images)
  return config_lib.steps(config, num_images)


def run(config, workdir, build, view) -> dict:
  """A protocol end to end: its train source, `build(config, steps=the run's Steps)`
  (-> runtime.Built with state, shardings, step, eval_step, batch_sharding), training views from
  `view(config)`, then `fit`."""
  local_batch = config.batch_size // jax.process_count()
  source = sources.make_source(config.data, config.model.image_size, config.seed, local_batch,
                               jax.process_index(), jax.process_count(),
                               split=config.data.train_split)
  # Before the encoder is restored (minutes for a large one from gs://).
  steps = resolve_steps(config, source.num_examples)
  built = build(config, steps=steps)
  batch_spec = built.batch_sharding

  def evaluate(state):
    _, batches = input_pipeline.eval_loader(config, config.data.eval_split, batch_spec)
    return scoring.accumulate(lambda b: built.eval_step(state, b), batches,
                              stop=runtime.stop_decision().poll)

  def make_loader(position):
    return pipeline.TrainLoader(
        source, batch_spec, local_batch, config.model.image_size, config.seed, start=position,
        workers=config.data.workers, prefetch=config.data.prefetch,
        max_failures=config.data.max_consecutive_failures, view=view(config),
        labels=True)

  return fit(config, workdir, built.state, built.shardings, built.step, evaluate,
             make_loader, steps)


def fit(config, workdir, state, state_shardings, step_fn, evaluate_fn, make_loader,
        steps: config_lib.Steps) -> dict:
  """Trains `state` for config.epochs and evaluates every config.eval_every_epochs.

  Args:
    state: the fresh train state (a dict with "step"), on the mesh.
    state_shardings: its NamedSharding tree (the restore target).
    step_fn: jitted (state, batch) -> (state, metrics).
    evaluate_fn: state -> {"top1", "top5", "loss", "count"} on the validation split, or
      None when a preemption stopped it (runtime.StopDecision).
    make_loader: records already consumed -> a TrainLoader.
    steps: the run's step arithmetic over its train set (config_lib.steps).

  Returns:
    the last evaluation's results (also written to <workdir>/results.json).
  """
  workdir = epath.Path(workdir)
  local_batch = config.batch_size // jax.process_count()
  eval_every = max(1, steps.of_epochs(config.eval_every_epochs))
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.checkpoint_every_steps,
                                  config.keep_checkpoints)
  position = None
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s, step %d", ckpt.directory, ckpt.latest_step())
    state, position = ckpt.restore(ckpt.latest_step(),
                                   runtime.with_shardings(state, state_shardings))
  step = int(state["step"])
  loader = make_loader(step * local_batch if position is None else position)
  writer = metrics.create_writer(str(workdir))
  if step == 0:
    writer.write_hparams(config.to_dict())
  results = {}
  logging.info("%s: steps %d..%d, %d images per step", config.protocol, step, steps.total,
               config.batch_size)

  def evaluate(state, step, done):
    if step % eval_every == 0 or done:
      scores = evaluate_fn(state)
      if scores is not None:  # None: a preemption stopped it; the loop saves and stops
        results.clear()
        results.update(scores)
        scoring.log_eval(writer, step, results)

  try:
    end = runtime.train_loop(
        state, step_fn, loader, ckpt, writer, start_step=step, steps=steps,
        log_every=config.log_every_steps, steps_in_flight=config.steps_in_flight,
        prefix="train/", after_step=evaluate, save_every=config.checkpoint_every_steps)
    if end.preempted:
      return dict(results)
    if not results:  # resumed at the end: report the finished model again
      scores = evaluate_fn(end.state)
      if scores is None:  # preempted: the rerun evaluates it
        return {}
      results.update(scores)
      scoring.log_eval(writer, end.step, results)
  finally:
    loader.close()
    ckpt.close()
    writer.close()
  scoring.write_results(workdir, dict(results, step=end.step))
  return dict(results)
