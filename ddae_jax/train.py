"""The pretraining loop: one batch from disk to the optimizer, in one function.

Sections: mesh and model, input, state (resume order), metrics, loop. Resume
order: the workdir's latest checkpoint, else `init_dir`'s latest (the whole
state, to continue another run in a new workdir), else fresh.
"""

from __future__ import annotations

import json
import logging

import jax
from etils import epath

from ddae_jax import config_checks, config_lib, metrics, runtime, sharding
from ddae_jax import train_step as ts
from ddae_jax.data import pipeline, sources
from ddae_jax.evaluation import evaluators as evaluators_lib
from ddae_jax.perf import flops
from ddae_jax.weights import checkpoints, pretrained


def train_and_evaluate(config, workdir: str, init_dir: str | None = None) -> dict:
  """Pretrains until config.epochs; returns the last logged metrics."""
  workdir = epath.Path(workdir)
  # ------------------------------------------------------------------ mesh, model
  devices = jax.devices()
  config_checks.validate(config, num_devices=len(devices))  # the run's one validation

  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", config.checkpoint_every_steps,
                                  config.keep_checkpoints)
  try:
    return _train(config, workdir, init_dir, devices, ckpt)
  finally:
    ckpt.close()  # waits for the last save; also on errors, so Orbax's threads end cleanly


def _train(config, workdir, init_dir, devices, ckpt) -> dict:
  local_batch = config.batch_size // jax.process_count()
  # ------------------------------------------------------------------ resume checks
  # Before anything is written: a rerun that cannot continue the saved run
  # stops here, leaving the run's record (config.json, checkpoints) as it was.
  resume, resume_dir = _resume_source(ckpt, workdir, init_dir)
  if resume is not None:
    saved = pretrained.load_config(resume_dir)
    if saved is not None:
      config_checks.check_resume_compatible(saved, config, str(resume_dir))

  # ------------------------------------------------------------------ input
  source = sources.make_source(config.data, config.model.image_size, config.seed, local_batch,
                               jax.process_index(), jax.process_count())
  # The run's one resolution: epochs count this dataset's images, attention follows
  # this platform; the config stays as given and everything below reads `derived`.
  derived = config_lib.resolve(config, devices[0].platform, source.num_examples)
  steps = derived.steps
  # Resuming restores into the abstract state: no fresh state is made beside it.
  built = ts.build(config, devices, materialize=resume is None, derived=derived)
  state, step_fn, mesh, abstract = built.state, built.step, built.mesh, built.abstract
  method = built.model
  del built  # `state` is the one reference to the state (the step donates it)

  # ------------------------------------------------------------------ state
  position = None
  if resume is not None:
    # The newest step that restores; damaged newer ones of this workdir are
    # moved to damaged_checkpoints/ (another run's directory is left alone).
    set_aside = workdir / "damaged_checkpoints" if resume is ckpt else None
    try:
      restored = resume.restore_latest_intact(abstract, set_aside)
    except checkpoints.StateMismatch as err:
      raise config_lib.ConfigError(f"{err}\nRerun with the config that run was started with "
                                   "or use a new --workdir.") from None
    finally:
      if resume is not ckpt:
        resume.close()
    state, position, step = restored  # not None: `resume` has steps
    logging.info("Resumed from %s, step %d", resume.directory, step)
  # Evaluation, analysis and export read the model back from here; written
  # only once the state it describes is in place.
  pretrained.save_config(workdir, config)
  _save_run_record(workdir, num_train_images=steps.num_images, total_steps=steps.total,
                   data=source.description)
  start_step = int(state["step"])
  if position is None:
    position = start_step * local_batch

  loader = pipeline.TrainLoader(
      source, sharding.batch_sharding(mesh), local_batch, config.model.image_size,
      config.seed, start=position, scale=config.data.crop_scale, flip=config.data.flip,
      workers=config.data.workers, prefetch=config.data.prefetch,
      color_jitter=config.data.get("color_jitter", 0.0),  # .get: older config.json files
      max_failures=config.data.max_consecutive_failures)

  # ------------------------------------------------------------------ metrics
  writer = metrics.create_writer(str(workdir))
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  flops_per_image = flops.train_flops_per_image(config, derived)["total"]
  peak = flops.peak_tflops()

  def log_extra(values, images_per_s):
    del values
    extra = {"skipped_images": loader.skipped}
    if peak:
      extra["mfu"] = images_per_s * flops_per_image / (peak * 1e12 * len(devices))
    return extra

  # ------------------------------------------------------------------ loop
  logging.info("Training steps %d..%d, %d images per step on %d devices", start_step,
               steps.total, config.batch_size, len(devices))
  try:
    evaluators = evaluators_lib.Evaluators(config, method, mesh, writer, workdir)
    evaluators.resume(state, start_step)  # an evaluation a preemption cut short
    end = runtime.train_loop(
        state, step_fn, loader, ckpt, writer, start_step=start_step, steps=steps,
        log_every=config.log_every_steps, steps_in_flight=config.steps_in_flight,
        log_extra=log_extra, after_step=evaluators.after_step)
  finally:
    loader.close()
    writer.close()
  return end.last


def _save_run_record(workdir, **values):
  """workdir/run.json: what the run derived at run time (the dataset's size, its steps)."""
  if jax.process_index() == 0:
    (workdir / "run.json").write_text(json.dumps(values, indent=2, sort_keys=True))


def _resume_source(ckpt, workdir, init_dir):
  """(the Checkpointer to resume from, its run directory), or (None, None) for a fresh run.

  The workdir's own checkpoints first, else --init_dir's.
  """
  if ckpt.manager.all_steps():
    return ckpt, workdir
  if not init_dir:
    return None, None
  other_dir = epath.Path(init_dir) / "checkpoints"
  if not other_dir.exists():
    raise checkpoints.CheckpointMissing(
        f"--init_dir={init_dir}: no checkpoint directory {other_dir}")
  other = checkpoints.Checkpointer(other_dir, 1, 1, create=False)
  if other.latest_step() is None:
    raise checkpoints.CheckpointMissing(f"--init_dir={init_dir}: no checkpoint in {other_dir}")
  return other, epath.Path(init_dir)
