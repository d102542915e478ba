"""The training loop fine-tuning and linear probing share: resume, step, log, evaluate, save.

Resume order: this workdir's latest checkpoint, else a fresh state (whose
encoder came from the pretraining run). A checkpoint holds the protocol's
train state and every process's input position, so a resumed run sees the
same augmented batches it would have seen. SIGTERM (or Orbax's preemption
notice) saves and stops; rerunning the command resumes.
"""

from __future__ import annotations

import logging
import time

import jax
from etils import epath

from ddae_jax import config_lib, metrics, runtime, sharding, train
from ddae_jax.data import pipeline, sources
from ddae_jax.evaluation import common, input_pipeline
from ddae_jax.evaluation import config as eval_config
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


def run(config, workdir, build, view) -> dict:
  """A protocol end to end: its train source, `build(config, num_train_images=n)`
  (-> state, shardings, step, eval_step, batch_sharding), training views from
  `view(config)`, then `fit`."""
  local_batch = config.batch_size // jax.process_count()
  source = sources.make_source(config.data, config.model.image_size, config.seed, local_batch,
                               jax.process_index(), jax.process_count(),
                               split=config.data.train_split)
  built = build(config, num_train_images=source.num_examples)
  batch_spec = built["batch_sharding"]

  def evaluate(state):
    _, batches = input_pipeline.eval_loader(config, config.data.eval_split, batch_spec)
    return common.accumulate(lambda b: built["eval_step"](state, b), batches)

  def make_loader(position):
    return pipeline.TrainLoader(
        source, batch_spec, local_batch, config.model.image_size, config.seed, start=position,
        workers=config.data.workers, prefetch=config.data.prefetch,
        max_failures=config.data.max_consecutive_failures, view=view(config),
        labels=True)

  return fit(config, workdir, built["state"], built["shardings"], built["step"], evaluate,
             make_loader, num_images=source.num_examples)


def fit(config, workdir, state, state_shardings, step_fn, evaluate_fn, make_loader,
        num_images: int | None = None) -> dict:
  """Trains `state` for config.epochs and evaluates every config.eval_every_epochs.

  Args:
    state: the fresh train state (a dict with "step"), on the mesh.
    state_shardings: its NamedSharding tree (the restore target).
    step_fn: jitted (state, batch) -> (state, metrics).
    evaluate_fn: state -> {"top1", "top5", "loss", "count"} on the validation split.
    make_loader: records already consumed -> a TrainLoader.
    num_images: the train set's size, which epochs count (None:
      config.num_train_images); the config is not changed.

  Returns:
    the last evaluation's results (also written to <workdir>/results.json).
  """
  workdir = epath.Path(workdir)
  local_batch = config.batch_size // jax.process_count()
  num_images = config.num_train_images if num_images is None else num_images
  total_steps = config_lib.total_steps(config, num_images)
  eval_every = max(1, config_lib.epochs_to_steps(config, config.eval_every_epochs, num_images))
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.checkpoint_every_steps,
                                  config.keep_checkpoints)
  position = None
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s, step %d", ckpt.directory, ckpt.latest_step())
    state, position = ckpt.restore(ckpt.latest_step(),
                                   checkpoints.abstract_like(state, state_shardings))
  step = int(state["step"])
  loader = make_loader(step * local_batch if position is None else position)
  writer = metrics.create_writer(str(workdir))
  if step == 0:
    writer.write_hparams(config.to_dict())
  progress = runtime.progress_action(total_steps, writer)
  preemption = runtime.Preemption()
  in_flight = runtime.StepsInFlight(config.steps_in_flight, step)
  results = {}
  logging.info("%s: steps %d..%d, %d images per step", config.protocol, step, total_steps,
               config.batch_size)
  tick, tick_step = time.perf_counter(), step
  try:
    while step < total_steps:
      state, step_metrics = step_fn(state, next(loader))
      step += 1
      if in_flight.push(step, step_metrics) and progress is not None:
        progress(in_flight.completed)  # steps the devices finished, not dispatched ones
      stop = preemption.requested or ckpt.preempted(step)
      done = step == total_steps
      if step % config.log_every_steps == 0 or done or stop:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        train._check_finite(values, step, ckpt)
        now = time.perf_counter()
        values.update(images_per_second=(step - tick_step) * config.batch_size / (now - tick),
                      epoch=step * config.batch_size / num_images)
        writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
        writer.flush()
        tick, tick_step = now, step
      if step % eval_every == 0 or done:
        results = evaluate_fn(state)
        common.log_eval(writer, step, results)
      if stop or done or step % config.checkpoint_every_steps == 0:
        ckpt.save(step, state, loader.position, force=True)
      if stop:
        logging.warning("Stopped at step %d for preemption; rerun the same command to resume.",
                        step)
        return results
    if not results:  # resumed at the end: report the finished model again
      results = evaluate_fn(state)
      common.log_eval(writer, step, results)
  finally:
    loader.close()
    ckpt.close()
    writer.close()
  common.write_results(workdir, dict(results, step=step))
  return results
