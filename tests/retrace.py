"""The no-retrace check on the pretraining step, with chex.assert_max_traces."""

import chex

from ddae_jax import train_step as ts


def trace_at_most_once(monkeypatch) -> list:
  """Steps built after this call raise chex's AssertionError if `ts.train_step` is traced twice.

  make_train_step's jitted function calls the module-level `train_step` by name
  when it traces, so the wrapped function is the one traced; it is wrapped
  whatever its signature. Returns a list that gets an entry per trace: a test
  checks it is not empty, i.e. that the check saw the step at all.
  """
  chex.clear_trace_counter()  # the counter is per process; parametrized tests share it
  checked = chex.assert_max_traces(ts.train_step, n=1)
  traces = []

  def train_step(*args, **kwargs):
    traces.append(None)
    return checked(*args, **kwargs)

  monkeypatch.setattr(ts, "train_step", train_step)
  return traces
