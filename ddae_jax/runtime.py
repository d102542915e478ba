"""What the training loops share to stop in time: preemption, steps in flight, progress.

JAX dispatches a step and returns before the devices run it, so a loop that
never waits can queue tens of steps ahead of the devices; a save (or the
exit after SIGTERM) then waits for all of them, far longer than the ~30 s a
spot VM grants. `StepsInFlight` bounds that queue by waiting on an older
step's metrics, and counts the steps the devices have completed, which is
what the progress report shows.
"""

from __future__ import annotations

import collections
import logging
import signal

import jax

from ddae_jax import metrics


class Preemption:
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
