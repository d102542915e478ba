"""One small wrapper over Orbax's CheckpointManager for the train state.

A checkpoint holds the whole train state (parameters, EMA parameters, optimizer
state with beta's moments, step, RNG key) and every process's input position.
Saves are asynchronous, at a fixed interval, on preemption and at the end; the
last `keep` are kept. Orbax writes each step into a temporary directory and
renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the partial one ignored.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointMissing(FileNotFoundError):
  """An explicitly named checkpoint directory has no checkpoint."""


class Checkpointer:

  def __init__(self, directory, every_steps: int, keep: int, use_async: bool = True,
               create: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps), create=create,
        enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save interval (preemption is `preempted`'s job)."""
    return self.manager.should_save(step)

  def preempted(self, step: int) -> bool:
    """Whether the cluster announced a preemption (a sync point on multi-host runs)."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, data_position: int, force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; every process must call it."""
    positions = multihost_utils.process_allgather(np.asarray(data_position, np.int64))
    data = {"positions": [int(p) for p in np.atleast_1d(positions)],
            "process_count": jax.process_count()}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)

  def restore(self, step: int, abstract_state):
    """(state, this process's data position) of checkpoint `step`.

    Args:
      abstract_state: jax.ShapeDtypeStruct tree with shardings: where each
        restored array goes.
    """
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    data = out["data"]
    if data["process_count"] != jax.process_count():
      # Per-process input streams differ with the process count; the
      # model state is still exact.
      logging.warning("Checkpoint written by %d processes, restoring into %d: the input "
                      "stream restarts from the step's first record.",
                      data["process_count"], jax.process_count())
      return out["state"], None
    return out["state"], data["positions"][jax.process_index()]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state_shapes, shardings):
  """ShapeDtypeStructs with shardings, the target layout of a restore."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)
