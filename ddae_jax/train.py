"""The pretraining loop: one batch from disk to the optimizer, in one function.

Sections: mesh and model, input, state (resume order), metrics, loop. Resume
order: the workdir's latest checkpoint, else `init_dir`'s latest (the whole
state, to continue another run in a new workdir), else fresh.
"""

from __future__ import annotations

import logging
import math
import signal
import time

import jax
import numpy as np
from etils import epath

from ddae_jax import checkpoints, config_lib, flops, metrics, pretrained, sharding
from ddae_jax import train_step as ts
from ddae_jax.data import pipeline, sources


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


class _Preemption:
  """Remembers a SIGTERM (what preemptible VMs send) so the loop can save and stop."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      pass

  def _handle(self, *_):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True


def train_and_evaluate(config, workdir: str, init_dir: str | None = None) -> dict:
  """Pretrains until config.epochs; returns the last logged metrics."""
  workdir = epath.Path(workdir)
  # ------------------------------------------------------------------ mesh, model
  devices = jax.devices()
  config_lib.validate(config, num_devices=len(devices))
  local_batch = config.batch_size // jax.process_count()

  # ------------------------------------------------------------------ input
  source = sources.make_source(config.data, config.model.image_size, config.seed, local_batch,
                               jax.process_index(), jax.process_count())
  with config.unlocked():
    config.num_train_images = source.num_examples  # epochs count this dataset's images
  # Evaluation, analysis and export read the model back from here.
  pretrained.save_config(workdir, config)
  total_steps = config_lib.total_steps(config)
  built = ts.build(config, devices)
  state, step_fn, mesh = built["state"], built["step"], built["mesh"]

  # ------------------------------------------------------------------ state
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.checkpoint_every_steps,
                                  config.keep_checkpoints)
  abstract = checkpoints.abstract_like(state, built["shardings"])
  position = None
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s, step %d", ckpt.directory, ckpt.latest_step())
    state, position = ckpt.restore(ckpt.latest_step(), abstract)
  elif init_dir:
    other_dir = epath.Path(init_dir) / "checkpoints"
    if not other_dir.exists():
      raise checkpoints.CheckpointMissing(
          f"--init_dir={init_dir}: no checkpoint directory {other_dir}")
    other = checkpoints.Checkpointer(other_dir, 1, 1, create=False)
    if other.latest_step() is None:
      raise checkpoints.CheckpointMissing(
          f"--init_dir={init_dir}: no checkpoint in {other.directory}")
    logging.info("Starting from %s, step %d", other.directory, other.latest_step())
    state, position = other.restore(other.latest_step(), abstract)
    other.close()
  start_step = int(state["step"])
  if position is None:
    position = start_step * local_batch

  loader = pipeline.TrainLoader(
      source, sharding.batch_sharding(mesh), local_batch, config.model.image_size,
      config.seed, start=position, scale=config.data.crop_scale, flip=config.data.flip,
      workers=config.data.workers, prefetch=config.data.prefetch,
      color_jitter=config.data.get("color_jitter", 0.0))  # .get: older config.json files

  # ------------------------------------------------------------------ metrics
  writer = metrics.create_writer(str(workdir))
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  flops_per_image = flops.train_flops_per_image(config)["total"]
  peak = flops.peak_tflops()
  progress = _progress_action(total_steps, writer)
  preemption = _Preemption()

  # ------------------------------------------------------------------ loop
  logging.info("Training steps %d..%d, %d images per step on %d devices", start_step,
               total_steps, config.batch_size, len(devices))
  last, step = {}, start_step
  tick, tick_step = time.perf_counter(), start_step
  try:
    while step < total_steps:
      batch = next(loader)
      state, step_metrics = step_fn(state, batch)
      step += 1
      if progress is not None:
        progress(step)
      stop = preemption.requested or ckpt.preempted(step)
      log_now = step % config.log_every_steps == 0 or step == total_steps
      save_now = stop or step == total_steps or ckpt.should_save(step)
      if log_now or save_now:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        _check_finite(values, step, ckpt)
      if log_now:
        now = time.perf_counter()
        images_per_s = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
        values.update(images_per_second=images_per_s, skipped_images=loader.skipped,
                      epoch=step * config.batch_size / config.num_train_images)
        if peak:
          values["mfu"] = images_per_s * flops_per_image / (peak * 1e12 * len(devices))
        writer.write_scalars(step, values)
        writer.flush()
        tick, tick_step, last = now, step, values
      if save_now:
        ckpt.save(step, state, loader.position, force=True)
      if stop:
        logging.warning("Stopped at step %d for preemption; rerun the same command to resume.",
                        step)
        break
  finally:
    loader.close()
    ckpt.close()
    writer.close()
  return last


def _check_finite(values: dict, step: int, ckpt: checkpoints.Checkpointer):
  if not math.isfinite(values["loss"]):
    ckpt.wait()  # the last good save finishes; nothing newer is written
    raise NonFiniteLoss(
        f"loss is {values['loss']} at step {step}; the last good checkpoint is step "
        f"{ckpt.latest_step()} in {ckpt.directory} (left intact). Lower the learning rate "
        "or enable optim.grad_clip_norm, then resume from it.")


def _progress_action(total_steps: int, writer):
  """CLU's ReportProgress (steps/s, ETA) where CLU imports; else None."""
  if jax.process_index() != 0 or not metrics.tensorflow_available():
    return None
  from clu import periodic_actions
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_secs=60.0)
