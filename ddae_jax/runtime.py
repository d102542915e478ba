"""What the three trainers share: sharded init, the loop, preemption, progress, finiteness.

Pretraining (train.py), fine-tuning and linear probing (evaluation/loop.py)
run the same loop (`train_loop`): dispatch a step, keep at most a few in
flight, log, save on the interval, at the end and on preemption.

JAX dispatches a step and returns before the devices run it, so a loop that
never waits can queue tens of steps ahead of the devices; a save (or the
exit after SIGTERM) then waits for all of them, far longer than the ~30 s a
spot VM grants. `StepsInFlight` bounds that queue by waiting on an older
step's metrics, and counts the steps the devices have completed, which is
what the progress report shows.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import signal
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils

from ddae_jax import config_lib, metrics, sharding


@dataclasses.dataclass(frozen=True)
class Built:
  """What a trainer's build() makes before any step runs (train_step.build, evaluation).

  Attributes:
    mesh: the device mesh.
    state: the train state on the devices; None for a run about to restore one.
    shardings: the state's NamedSharding tree.
    step: jitted (state, batch) -> (state, metrics).
    abstract: the state's ShapeDtypeStructs with their shardings.
    model, tx: the method (or classifier) and the optimizer.
    schedule: the optimizer's learning-rate schedule (step -> rate).
    eval_step: (state, batch) -> classification sums (fine-tuning, linear probing).
    batch_sharding: where each batch goes.
    init_state: the state's init function (fine-tuning: (rng, encoder params or None)).
  """
  mesh: Any
  state: Any
  shardings: Any
  step: Callable
  abstract: Any = None
  model: Any = None
  tx: Any = None
  schedule: Callable | None = None
  eval_step: Callable | None = None
  batch_sharding: Any = None
  init_state: Callable | None = None


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


def sharded_state(init: Callable, mesh, rules, *args, materialize: bool = True):
  """A train state made directly on the devices, each leaf laid out by the sharding rules.

  Args:
    init: (*args) -> state (a pytree); traced once for shapes, then jitted.
    rules: config.sharding.rules.
    materialize: False computes only shapes and shardings (a run about to
      restore a checkpoint: a fresh state beside the restored one would double
      the device memory).

  Returns:
    (state or None, shardings, abstract): the NamedSharding tree and the
    ShapeDtypeStructs with those shardings (the target of a restore).
  """
  shapes = jax.eval_shape(init, *args)
  shardings = sharding.state_shardings(shapes, mesh, rules)
  abstract = with_shardings(shapes, shardings)
  state = jax.jit(init, out_shardings=shardings)(*args) if materialize else None
  return state, shardings, abstract


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` placed by `shardings` (a restore's or a compile's target)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def check_finite(values: dict, step: int, ckpt) -> None:
  """Raises NonFiniteLoss when values["loss"] is NaN or Inf, after the last good save."""
  if not math.isfinite(values["loss"]):
    ckpt.wait()  # the last good save finishes; nothing newer is written
    raise NonFiniteLoss(
        f"loss is {values['loss']} at step {step}; the last good checkpoint is step "
        f"{ckpt.latest_step()} in {ckpt.directory} (left intact). Lower the learning rate "
        "or enable optim.grad_clip_norm, then resume from it.")


class StopDecision:
  """Whether the run stops now for a preemption: one answer, the same on every process.

  Poll it where every process passes equally often and in the same order:
  the train loop polls before each dispatch; code that runs its own steps
  inside the loop (an evaluation pass) may poll between them and, on True,
  return at once; the loop then saves and stops. Once True it stays True.

  Several processes: JAX's preemption sync point. jax.distributed.initialize
  installs JAX's SIGTERM handler, which tells the coordination service; every
  process's background thread then takes the highest poll count any process
  has reached, plus one, as the stop point, so all stop after the same step
  whichever host got the signal (even one blocked in a collective, whose
  Python code cannot run). No Python SIGTERM handler is installed then: it
  would replace JAX's (one handler per signal and process), and the notice
  would never leave the host.
  One process: a SIGTERM flag set by a Python handler.

  Attributes:
    polls: how often poll() asked (the sync manager's counter).
    stopped: the latched answer.
  """

  def __init__(self):
    self.polls = 0
    self.stopped = False
    self._signalled = False
    self.synced = jax.distributed.is_initialized()
    if self.synced and not getattr(jax.config, "jax_enable_preemption_service", True):
      raise config_lib.ConfigError(
          "jax_enable_preemption_service is off: the processes of this run could not stop "
          "together on SIGTERM. Turn it on (JAX_ENABLE_PREEMPTION_SERVICE=1).")
    if not self.synced:
      try:
        signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass

  def _handle(self, *_):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._signalled = True

  def poll(self) -> bool:
    """True from the poll at which every process stops on; call it on every process."""
    if not self.stopped:
      self.polls += 1
      if self.synced:
        self.stopped = multihost_utils.reached_preemption_sync_point(self.polls)
      else:
        self.stopped = self._signalled
      if self.stopped and self.synced:
        logging.warning("Preemption notice: every process stops at poll %d.", self.polls)
    return self.stopped


_decision: StopDecision | None = None


def stop_decision() -> StopDecision:
  """This process's StopDecision (one per process: its poll count is the run's)."""
  global _decision
  if _decision is None:
    _decision = StopDecision()
  return _decision


class StepsInFlight:
  """Keeps at most `depth` dispatched steps unfinished; knows the last completed one.

  Attributes:
    completed: the newest step whose metrics are ready on the host side (the
      devices have run it and every step before it).
  """

  def __init__(self, depth: int, start_step: int):
    self.depth = max(1, int(depth))
    self.completed = start_step
    self._pending: collections.deque = collections.deque()

  def push(self, step: int, step_metrics) -> bool:
    """Records dispatched `step`; waits for older steps beyond the depth.

    Returns:
      whether `completed` advanced.
    """
    self._pending.append((step, step_metrics))
    before = self.completed
    while len(self._pending) > self.depth:
      done, values = self._pending.popleft()
      jax.block_until_ready(values)
      self.completed = done
    return self.completed != before


def progress_action(total_steps: int, writer):
  """CLU's ReportProgress (steps/s, ETA) where CLU imports; else None.

  Call it with completed steps (`StepsInFlight.completed`), not dispatched ones.
  """
  if jax.process_index() != 0 or not metrics.tensorflow_available():
    return None
  from clu import periodic_actions
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_secs=60.0)


@dataclasses.dataclass
class LoopEnd:
  """Where `train_loop` stopped: the state, its step, the last logged values, why."""
  state: Any
  step: int
  last: dict
  preempted: bool


def train_loop(state, step_fn, loader, ckpt, writer, *, start_step: int,
               steps: config_lib.Steps, log_every: int, steps_in_flight: int,
               prefix: str = "", log_extra: Callable | None = None,
               after_step: Callable | None = None,
               save_every: int | None = None) -> LoopEnd:
  """Runs `step_fn` from `start_step` to `steps.total`; logs, saves, stops on preemption.

  Before each dispatch the loop polls `stop_decision()` (SIGTERM on one
  process; JAX's preemption sync point, the same step on every process, on
  several): once it says stop, no new step reaches the devices, at most
  `steps_in_flight` are left to finish, and the state is saved at the last
  dispatched step. `after_step` may poll it too and return early.
  Saves: on the checkpointer's interval (Orbax's, which also saves the first step
  of a run with no checkpoint) or every `save_every` steps, at the end, on
  preemption; never twice a step.
  Metrics of a step are fetched only when logged or saved; a non-finite loss
  then stops the run (NonFiniteLoss) with the last good checkpoint intact.

  Args:
    state: the train state (donated to `step_fn` each step).
    steps: the run's step arithmetic (its total, and the epoch and images/s it logs).
    step_fn: (state, batch) -> (state, metrics of float32 scalars).
    loader: an iterator of batches with `.position` (records consumed).
    ckpt: a weights.checkpoints.Checkpointer.
    writer: a metrics writer; values go out as f"{prefix}{name}".
    log_extra: (values, images_per_second) -> more values to log (MFU, ...).
    after_step: (state, step, done) -> None, after the step's log (evaluation).

  Returns:
    LoopEnd.
  """
  total_steps = steps.total
  progress = progress_action(total_steps, writer)
  decision = stop_decision()
  in_flight = StepsInFlight(steps_in_flight, start_step)
  last, step, step_metrics = {}, start_step, None
  tick, tick_step = time.perf_counter(), start_step
  while step < total_steps:
    stop = decision.poll()
    if not stop:
      state, step_metrics = step_fn(state, next(loader))
      step += 1
      if in_flight.push(step, step_metrics) and progress is not None:
        progress(in_flight.completed)  # steps the devices finished, not dispatched ones
    done = step == total_steps
    log_now = not stop and (step % log_every == 0 or done)
    on_interval = ckpt.should_save(step) if save_every is None else step % save_every == 0
    save_now = (stop or done or on_interval) and ckpt.latest_step() != step
    if (log_now or save_now) and step > start_step:
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      check_finite(values, step, ckpt)
    if log_now:
      now = time.perf_counter()
      images_per_s = (step - tick_step) * steps.batch_size / max(now - tick, 1e-9)
      epoch = step * steps.batch_size / steps.num_images
      values.update(images_per_second=images_per_s, epoch=epoch)
      if log_extra is not None:
        values.update(log_extra(values, images_per_s))
      writer.write_scalars(step, {f"{prefix}{k}": v for k, v in values.items()})
      writer.flush()
      tick, tick_step, last = now, step, values
    if after_step is not None and not stop:
      after_step(state, step, done)
    if save_now:
      ckpt.save(step, state, loader.position, force=True)
    if stop or (done and decision.stopped):  # (an evaluation after the last step stopped)
      logging.warning("Stopped at step %d for preemption; rerun the same command to resume.",
                      step)
      return LoopEnd(state, step, last, preempted=True)
  return LoopEnd(state, step, last, preempted=False)
