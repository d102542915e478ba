"""One small wrapper over Orbax's CheckpointManager for the train state.

A checkpoint holds the whole train state (parameters, EMA parameters, optimizer
state with beta's moments, step, RNG key) and every process's input position.
Saves are asynchronous, at a fixed interval, on preemption and at the end; the
last `keep` are kept. Orbax writes each step into a temporary directory and
renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the partial one ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import jax
import orbax.checkpoint as ocp

from ddae_jax import cluster
from ddae_jax.weights.shapes import shapes_of

# The items of every checkpoint written or read here: the train state's arrays
# and the JSON input positions. Pretraining, `convert import` and every
# restore (ddae_jax/weights/pretrained.py) open directories through
# `open_manager`, so the layout is spelled once.
STATE, DATA = "state", "data"


class CheckpointMissing(FileNotFoundError):
  """An explicitly named checkpoint directory has no checkpoint."""


class CheckpointDamaged(RuntimeError):
  """No checkpoint of a run restores; the message names each step and why."""


class StateMismatch(ValueError):
  """A checkpoint's state tree differs from the one the config builds."""


class _Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, except that it never asks JAX about preemption.

  Whether the run stops is runtime.StopDecision's question, asked once per
  poll with its own counter. JAX's sync manager keeps only the last value it
  was given (`call_counter_ = step`) and stops where that equals the agreed
  point (`==`); Orbax asks it too, with train steps, from `should_save`,
  `save` and the thread that finalizes an async save (an older step). Such a
  call just before a notice would make the processes agree on a point the
  loop has already passed, and the run would never stop.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def open_manager(directory, read_only: bool = False, **options) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with the (STATE, DATA) items.

  Args:
    read_only: only read an existing directory (steps, metadata, restores);
      nothing is created or written.
    **options: more ocp.CheckpointManagerOptions (max_to_keep, save interval,
      async saves, create).
  """
  if read_only:
    options.update(create=False, read_only=True)
  return _Manager(
      directory, options=ocp.CheckpointManagerOptions(**options),
      item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()})


def save_args(state, positions: list[int]) -> ocp.args.Composite:
  """What `manager.save` writes: the state's arrays and each process's input position."""
  data = {"positions": [int(p) for p in positions], "process_count": len(positions)}
  return ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                               DATA: ocp.args.JsonSave(data)})


def restore_args(abstract_state, data: bool = True) -> ocp.args.Composite:
  """What `manager.restore` reads: the state into `abstract_state`'s layout (and the positions).

  Args:
    abstract_state: jax.ShapeDtypeStruct tree with shardings: where each
      restored array goes.
    data: also read the input positions (a resuming run); False = the state only.
  """
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data:
    items[DATA] = ocp.args.JsonRestore()
  return ocp.args.Composite(**items)


# How long a closing loop waits for the reads still in flight before it cancels them.
_DRAIN_TIMEOUT_S = 120.0


class _LoopThatEndsItsTasks(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks finish before it closes.

  Orbax (from 0.12.5) runs a restore as `loop.run_until_complete(...)` then
  `loop.close()` on a fresh loop. When one array's read fails, the gather of
  all reads raises at once and the loop is closed with the other reads still
  pending in TensorStore; each of those later calls `call_soon_threadsafe` on
  the closed loop ("RuntimeError: Event loop is closed", a traceback per read).
  Here the reads already in flight complete first (their results and errors
  are collected and dropped: the attempt has failed), so no TensorStore
  callback is left to reach a closed loop. Cancelling them instead (what
  `asyncio.run` does) races: a read completing in TensorStore's thread at
  that moment still posts to the loop after it closed (seen once in about ten
  runs). Only what is still running after _DRAIN_TIMEOUT_S is cancelled.
  """

  def close(self):
    if not self.is_closed() and not self.is_running():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        _, late = self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
        for task in late:
          task.cancel()
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _PolicyOfLoopsThatEndTheirTasks(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self):
    return _LoopThatEndsItsTasks()


@contextlib.contextmanager
def no_io_outlives_a_failed_read():
  """Within it, every new event loop lets its pending tasks finish when closed (see above).

  The policy is process-wide while it holds; a restore runs before any save of
  the run starts, and the loops it gives other threads behave as usual when
  nothing is pending.
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_PolicyOfLoopsThatEndTheirTasks())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


class Checkpointer:

  def __init__(self, directory, every_steps: int, keep: int, use_async: bool = True,
               create: bool = True):
    self.directory = directory
    self._options = dict(max_to_keep=keep, save_interval_steps=max(1, every_steps),
                         create=create, enable_async_checkpointing=use_async)
    self.manager = open_manager(directory, **self._options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save interval (preemption is runtime.StopDecision's job)."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_position: int, force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; every process must call it.

    The input positions are exchanged through the coordination service with
    a deadline (cluster.allgather_int), not a device collective that would
    wait forever for a process that is not saving.
    """
    positions = cluster.allgather_int(cluster.unique_name(f"checkpoint_positions/{step}"),
                                      data_position)
    return self.manager.save(step, args=save_args(state, positions), force=force)

  def restore(self, step: int, abstract_state):
    """(state, this process's data position) of checkpoint `step`.

    Args:
      abstract_state: jax.ShapeDtypeStruct tree with shardings: where each
        restored array goes.
    """
    with no_io_outlives_a_failed_read():
      out = self.manager.restore(step, args=restore_args(abstract_state))
    data = out[DATA]
    if data["process_count"] != jax.process_count():
      # Per-process input streams differ with the process count; the
      # model state is still exact.
      logging.warning("Checkpoint written by %d processes, restoring into %d: the input "
                      "stream restarts from the step's first record.",
                      data["process_count"], jax.process_count())
      return out[STATE], None
    return out[STATE], data["positions"][jax.process_index()]

  def restore_latest_intact(self, abstract_state, set_aside=None):
    """(state, data position, step) of the newest checkpoint that restores, or None if none exist.

    A step whose files are damaged (truncated, metadata deleted) is skipped with
    a warning naming it and the error, and older steps are tried. A step whose
    tree differs from `abstract_state` is not damage: StateMismatch is raised.

    Args:
      abstract_state: the restore target (`runtime.with_shardings`).
      set_aside: where the skipped newer steps are moved (kept for inspection,
        and out of the way of the saves that will reach their step numbers);
        None leaves them (another run's directory).

    Raises:
      StateMismatch; CheckpointDamaged when no step restores.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        check_tree(self.directory, step, abstract_state)
        state, position = self.restore(step, abstract_state)
      except StateMismatch:
        raise
      except Exception as err:  # noqa: BLE001 -- any read failure means this step is unusable
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        logging.warning("Checkpoint step %d in %s does not restore (%s); trying an older one.",
                        step, self.directory, reason)
        damaged.append((step, reason))
        continue
      if damaged:
        skipped = [s for s, _ in damaged]
        if set_aside is not None:
          self._set_aside(skipped, set_aside)
        logging.warning("Resumed from step %d; skipped damaged step(s) %s%s.", step, skipped,
                        f", moved to {set_aside}" if set_aside is not None else "")
      return state, position, step
    if damaged:
      raise CheckpointDamaged(
          f"no checkpoint in {self.directory} restores: "
          + "; ".join(f"step {s}: {r}" for s, r in damaged)
          + ". Remove or repair the damaged steps, or start a new --workdir.")
    return None

  def _set_aside(self, steps, set_aside):
    """Moves damaged steps to `set_aside/<step>` (process 0), then reopens the manager."""
    from etils import epath
    if jax.process_index() == 0:
      target = epath.Path(set_aside)
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest, n = target / str(step), 0
        while dest.exists():
          n += 1
          dest = target / f"{step}.{n}"
        _move_tree(epath.Path(self.directory) / str(step), dest)
    cluster.barrier(cluster.unique_name("checkpoints_set_aside"))
    self.manager.close()
    self.manager = open_manager(self.directory, **self._options)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _move_tree(src, dest) -> None:
  """Moves directory `src` to `dest`: a rename locally; on object stores (gs://) a copy of
  every object, then the source's deletion.

  An object store has no directories to rename (epath's gcsfs backend refuses a
  destination "folder" that holds no object yet), so its objects are copied
  one by one. A process killed midway leaves the source whole or partly
  deleted, still in the run's checkpoint directory and still damaged: the next
  run sets it aside again, under a new name.
  """
  if "://" not in str(src):
    src.rename(dest)
    return
  def files(directory):  # epath refuses `rglob` on gs:// (one listing per level instead)
    for path in directory.iterdir():
      yield from files(path) if path.is_dir() else (path,)

  for path in files(src):
    target = dest / str(path)[len(str(src)) + 1:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(path.read_bytes())
  src.rmtree()


def check_tree(directory, step: int, abstract_state) -> None:
  """Raises StateMismatch, naming up to 5 paths, if checkpoint `step`'s arrays differ.

  Reads only the checkpoint's metadata; an unreadable one raises whatever
  Orbax raises (the step is damaged).
  """
  manager = open_manager(directory, read_only=True)
  try:
    with no_io_outlives_a_failed_read():  # reads each array's .zarray through TensorStore
      metadata = manager.item_metadata(step)
    # Names only ("a/b/0"): the metadata stores optax's named tuples as dicts.
    saved = shapes_of(metadata[STATE]) if metadata and metadata.get(STATE) else {}
  finally:
    manager.close()
  if not saved:  # Orbax returns an empty tree when _METADATA is missing
    raise CheckpointDamaged(f"step {step}: no readable metadata of its state")
  wanted = shapes_of(abstract_state)
  diffs = [f"{p}: checkpoint {saved.get(p, 'absent')}, requested {wanted.get(p, 'absent')}"
           for p in sorted(set(saved) | set(wanted)) if saved.get(p) != wanted.get(p)]
  if diffs:
    raise StateMismatch(
        f"checkpoint step {step} in {directory} holds another train state than the config "
        f"builds ({len(diffs)} arrays differ), e.g.\n  " + "\n  ".join(diffs[:5]))
