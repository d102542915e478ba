"""runtime.py: the stop decision every process of a run agrees on, the steps kept in flight,
and the train loop's save and stop when an evaluation inside it is told to stop."""

import os
import re
import signal

import jax.numpy as jnp
import pytest
import trainer_utils as tu

from ddae_jax import runtime

# ------------------------------------------------------------- the stop decision
# Each process polls at its own pace (no collective between polls); process
# 0 alone gets SIGTERM. JAX's handler must still be the one installed.
_POLL_AFTER_SIGTERM = r'''
import os, signal, sys, time
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
from ddae_jax import runtime
decision = runtime.StopDecision()
print("python handler:", callable(signal.getsignal(signal.SIGTERM)), flush=True)
time.sleep(1.0)
if pid == 0:
  os.kill(os.getpid(), signal.SIGTERM)
start = time.monotonic()
while not decision.poll() and time.monotonic() - start < 60:
  time.sleep(0.03 if pid == 0 else 0.05)
print(f"stopped={decision.stopped} at poll {decision.polls} "
      f"after {time.monotonic() - start:.2f} s", flush=True)
'''


def test_a_sigterm_to_one_process_stops_every_process_at_the_same_poll():
  outs = tu.run_script_processes(_POLL_AFTER_SIGTERM)
  polls = []
  for rc, out in outs:
    assert rc == 0 and "python handler: False" in out, out[-2000:]
    found = re.search(r"stopped=True at poll (\d+) after ([\d.]+) s", out)
    assert found, out[-2000:]
    polls.append(int(found[1]))
    # JAX's notifier looks for the signal every second; the notice and the
    # agreement on a poll take milliseconds.
    assert float(found[2]) < 10.0, out[-2000:]
  assert polls[0] == polls[1], polls


_ONE_PROCESS = r'''
import os, signal, sys
from ddae_jax import runtime
decision = runtime.StopDecision()
before = decision.poll()
os.kill(os.getpid(), signal.SIGTERM)
print("polls:", before, decision.poll(), decision.poll(), decision.polls, flush=True)
'''


def test_one_process_stops_on_its_own_sigterm_and_stays_stopped():
  (rc, out), = tu.run_script_processes(_ONE_PROCESS, n=1)
  assert rc == 0 and "polls: False True True 2" in out, out[-2000:]


class _Loader:
  """Batches of nothing; `position` counts them, as pipeline.TrainLoader counts records."""
  position = 0

  def __next__(self):
    self.position += 1
    return {}


@pytest.mark.parametrize("stops_at,total", [(3, 8), (4, 4)])  # mid-run; at the last step
def test_an_evaluation_inside_the_loop_that_stops_makes_the_loop_save_and_stop(
    tmp_path, monkeypatch, stops_at, total):
  """Fine-tuning's evaluation polls between its batches; the loop then saves and stops."""
  import jax
  import jax.numpy as jnp

  from ddae_jax import config_lib, metrics, runtime
  from ddae_jax.evaluation import scoring
  from ddae_jax.weights import checkpoints
  previous = signal.getsignal(signal.SIGTERM)
  decision = runtime.StopDecision()  # one process: its own SIGTERM handler
  assert signal.getsignal(signal.SIGTERM) != previous  # (else the SIGTERM below ends pytest)
  monkeypatch.setattr(runtime, "stop_decision", lambda: decision)
  evaluated = []

  def evaluate(state, step, done):
    del state, done
    if step == stops_at:
      os.kill(os.getpid(), signal.SIGTERM)
    scores = scoring.accumulate(lambda b: {"top1": 1.0, "top5": 1.0, "loss": 0.0, "count": 1},
                                range(5), stop=decision.poll)
    evaluated.append((step, scores is not None))

  step_fn = jax.jit(lambda state, batch: ({"step": state["step"] + 1},
                                          {"loss": jnp.float32(1.0)}))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), 100, 3, use_async=False)
  try:
    end = runtime.train_loop({"step": jnp.int32(0)}, step_fn, _Loader(), ckpt,
                             metrics.JsonlWriter(str(tmp_path)), start_step=0,
                             steps=config_lib.Steps(1, 1, total, 0, 0.0), log_every=1,
                             steps_in_flight=2, after_step=evaluate)
  finally:
    ckpt.close()
    signal.signal(signal.SIGTERM, previous)
  assert evaluated == [(s, s < stops_at) for s in range(1, stops_at + 1)]
  assert (end.preempted, end.step, int(end.state["step"])) == (True, stops_at, stops_at)
  assert ckpt.manager.all_steps()[-1] == stops_at
  assert decision.polls == 1 + stops_at + (stops_at - 1) * 5  # no poll after the stop


# ------------------------------------------------------------- steps in flight
def test_steps_in_flight_waits_on_the_step_depth_behind_and_counts_completed():
  in_flight = runtime.StepsInFlight(depth=2, start_step=10)
  advanced = [in_flight.push(s, {"loss": jnp.float32(s)}) for s in range(11, 16)]
  assert advanced == [False, False, True, True, True]
  assert in_flight.completed == 13  # 14 and 15 may still run
  # Two steps (14 and 15) are held unfinished: the next push waits on 14 alone, then 15.
  assert in_flight.push(16, {"loss": jnp.float32(16)}) and in_flight.completed == 14
  assert in_flight.push(17, {"loss": jnp.float32(17)}) and in_flight.completed == 15
