"""A pod survives preemption (issue 27): the processes of a run stop together on SIGTERM,
a lost process ends the others within the heartbeat timeout, and reruns resume exactly.

Two processes on 127.0.0.1 form one run through jax.distributed, as the hosts
of a TPU slice do. The bounds asserted here are the README's ("A preempted
pod"). The stop decision itself (one process, two processes polling) is tested in
tests/test_runtime.py.
"""

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import trainer_utils as tu

# ------------------------------------------------------------- two-process runs

def _overrides(steps: int, *more) -> tuple:
  """`steps` of configs/tiny.py (16 per epoch), a save every 4, each step logged (its step
  number is how the tests know where a run is)."""
  return (f"--config.epochs={steps / 16}", "--config.optim.warmup_epochs=0.5",
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=1", *more)


STEPS = 24
# SIGTERM (to any process) -> every process has exited with status 0. On this
# 2-core CPU about 7 s (README); the bound allows for a loaded machine.
STOP_WITHIN_S = 60
# The runs that are not about a lost process keep JAX's heartbeat timeout (100 s), as a
# user's run does. A short one there would end a healthy run whenever the whole machine
# pauses for longer (a VM snapshot or live migration: on resume every heartbeat is stale at
# once, and the service names every process, "unhealthy ...: 0 1"); that ended a clean-clone
# CI run on 2026-12-05.
OVERRIDES = _overrides(STEPS)
# The SIGKILL run alone shortens it, so that process 0 is ended within the test's time. Then
# SIGKILL of process 1 -> process 0 has exited (non-zero): the timeout plus time to end.
HEARTBEAT_S = 10
LOST_WITHIN_S = HEARTBEAT_S + 50
KILL_OVERRIDES = (*OVERRIDES, f"--heartbeat_timeout={HEARTBEAT_S}")


def _logs(procs) -> str:
  return "".join(f"\n--- process {i}:\n{p.output()[-4000:]}" for i, p in enumerate(procs))


def _logged_step(workdir) -> int:
  """The newest step in process 0's metrics.jsonl (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  steps = [0]
  if os.path.exists(path):
    for line in open(path):
      try:
        steps.append(json.loads(line)["step"] if '"loss"' in line else 0)
      except ValueError:  # a line being written
        pass
  return max(steps)


def _saving(workdir) -> list[int]:
  """Steps whose save is under way (Orbax's temporary directories)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [int(m[1]) for m in map(re.compile(r"(\d+)\.orbax-checkpoint-tmp").match, names) if m]


def _wait_until(procs, condition, what: str, timeout_s: float = 600):
  start = time.monotonic()
  while not condition():
    if any(p.poll() is not None for p in procs):
      pytest.fail(f"a process exited before {what}:{_logs(procs)}")
    if time.monotonic() - start > timeout_s:
      pytest.fail(f"no {what} within {timeout_s} s:{_logs(procs)}")
    time.sleep(0.02)


def _wait_all(procs, timeout_s: float = 600) -> list[int]:
  for p in procs:
    try:
      p.wait(timeout=timeout_s)
    except Exception:
      for q in procs:
        q.kill()
      pytest.fail(f"a process still runs after {timeout_s} s:{_logs(procs)}")
  return [p.returncode for p in procs]


def _resumed_from(procs) -> list[int]:
  return [int(m[1]) if (m := re.search(r"Resumed from \S+, step (\d+)", p.output())) else None
          for p in procs]


def _stopped_together(procs, workdir, signalled_at: float) -> int:
  """Checks what a preempted run leaves; returns the step it stopped at.

  Both processes exited with status 0 within STOP_WITHIN_S of the first
  signal, each logged one stop at the same step, and that step's checkpoint is
  complete, the newest, holds that step's state and both processes' input
  positions at that step; no save is left half-written.
  """
  codes = _wait_all(procs, STOP_WITHIN_S + 300)
  elapsed = time.monotonic() - signalled_at
  assert codes == [0, 0], _logs(procs)
  assert elapsed <= STOP_WITHIN_S, (elapsed, _logs(procs))
  stops = [re.findall(r"Stopped at step (\d+) for preemption", p.output()) for p in procs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], (stops, _logs(procs))
  step = int(stops[0][0])
  assert tu.checkpoint_steps(workdir)[-1] == step and _saving(workdir) == [], os.listdir(
      os.path.join(workdir, "checkpoints"))
  arrays, data = tu.checkpoint_arrays(workdir, step)
  assert int(arrays["['step']"]) == step
  assert data["positions"] == [step * 8, step * 8]  # a local batch of 8 per process
  print(f"stopped at step {step}, both exited {elapsed:.1f} s after the signal")
  return step


def _sigterm_to_process_0(run, cache):
  procs = tu.start_processes(run, *OVERRIDES, cache_dir=cache)
  _wait_until(procs, lambda: _logged_step(run) >= 3, "step 3")
  procs[0].send_signal(signal.SIGTERM)
  return _stopped_together(procs, run, time.monotonic())


def _sigterm_during_a_save_to_process_1_then_2s_later_to_process_0(run, cache, resume):
  procs = tu.start_processes(run, *OVERRIDES, cache_dir=cache)
  saving = []
  _wait_until(procs, lambda: saving.extend(s for s in _saving(run) if s > resume) or saving,
              "a save after the resume")
  procs[1].send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  time.sleep(2.0)
  procs[0].send_signal(signal.SIGTERM)  # (nothing once it has exited)
  assert _resumed_from(procs) == [resume, resume], _logs(procs)
  stop = _stopped_together(procs, run, signalled)
  assert saving[0] in tu.checkpoint_steps(run) and stop >= saving[0]  # the save completed
  return stop


def _sigkill_to_process_1(run, cache, resume):
  """Returns the last complete checkpoint's step."""
  procs = tu.start_processes(run, *KILL_OVERRIDES, cache_dir=cache)
  saved = lambda: [s for s in tu.checkpoint_steps(run) if s > resume]  # noqa: E731
  _wait_until(procs, lambda: saved() and _logged_step(run) >= saved()[0] + 2,
              "a checkpoint after the resume and two more steps")
  assert _resumed_from(procs) == [resume, resume], _logs(procs)
  procs[1].kill()  # SIGKILL, as from the OOM killer; a lost host looks the same
  killed_at = time.monotonic()
  code, = _wait_all(procs[:1], LOST_WITHIN_S + 300)
  elapsed = time.monotonic() - killed_at
  procs[1].wait()
  assert code != 0 and elapsed <= LOST_WITHIN_S, (code, elapsed, _logs(procs))
  # JAX's coordination service names the process that stopped sending heartbeats.
  assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b",
                   procs[0].output()), _logs(procs)
  print(f"process 0 exited (status {code}) {elapsed:.1f} s after process 1 was killed")
  return tu.checkpoint_steps(run)[-1]


@pytest.mark.slow  # five two-process runs of the tiny model: 6 to 7 min on 2 cores at load 9
def test_preempted_or_killed_runs_stop_in_bounded_time_and_resume_to_the_same_result(tmp_path):
  """SIGTERM to process 0; to both 2 s apart, the first (to process 1) while a checkpoint is
  being written; SIGKILL to process 1. Each rerun resumes where the run before it stopped (the
  last complete checkpoint after the SIGKILL) and is interrupted in turn; the last ends
  bit-identical to an uninterrupted two-process run."""
  cache = str(tmp_path / "jax_cache")  # process 0 loads what it compiled before
  reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
  procs = tu.start_processes(reference, *OVERRIDES, cache_dir=cache)
  assert _wait_all(procs) == [0, 0], _logs(procs)

  stop = _sigterm_to_process_0(run, cache)
  stop = _sigterm_during_a_save_to_process_1_then_2s_later_to_process_0(run, cache, stop)
  last_complete = _sigkill_to_process_1(run, cache, stop)

  procs = tu.start_processes(run, *OVERRIDES, cache_dir=cache)
  assert _wait_all(procs) == [0, 0], _logs(procs)
  assert _resumed_from(procs) == [last_complete, last_complete], _logs(procs)
  expected, expected_data = tu.checkpoint_arrays(reference, STEPS)
  got, data = tu.checkpoint_arrays(run, STEPS)
  assert data == expected_data and sorted(got) == sorted(expected)
  for path, leaf in expected.items():
    np.testing.assert_array_equal(got[path], leaf, err_msg=path)
