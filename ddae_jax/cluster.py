"""What the processes of one run exchange on the host, each wait bounded.

Several processes form one run through `jax.distributed`; process 0 hosts
JAX's coordination service and every process's client sends it a heartbeat.
A device collective (an all-gather, a barrier made of a psum) waits without a
deadline for every process to join it, so a process that never arrives (it
took another branch, or it is stuck) would hold the others forever. The
exchanges here go through the coordination service's key-value store
instead, with a deadline: past it, `ProcessLost` names the processes that
did not answer. A process that died is caught sooner, by the service
itself: after `heartbeat_timeout` seconds without its heartbeat every other
process is ended with an error naming it (README, "When a host is lost").

One process: every function here returns at once.
"""

from __future__ import annotations

import itertools
import time

import jax

# JAX's default (jax.distributed.initialize's heartbeat_timeout_seconds).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# How long a host-side exchange waits for every process: Orbax's barrier
# default and JAX's shutdown timeout.
EXCHANGE_TIMEOUT_S = 300

_exchanges = itertools.count()  # every process exchanges in the same order


class ProcessLost(RuntimeError):
  """Some process of the run did not reach a host-side exchange before its deadline."""


def _client():
  """The coordination service's client of this process (None: one process, no service)."""
  # No public accessor exists; Orbax reads the same attribute
  # (orbax.checkpoint.multihost.get_jax_distributed_client).
  from jax._src import distributed
  return distributed.global_state.client


def unique_name(prefix: str) -> str:
  """f"{prefix}/{n}": n counts this process's exchanges, so the same on every process."""
  return f"{prefix}/{next(_exchanges)}"


def allgather_int(name: str, value: int, timeout_s: float = EXCHANGE_TIMEOUT_S) -> list[int]:
  """Every process's `value`, in process order.

  Args:
    name: the same on every process and never reused in the run (`unique_name`).

  Raises:
    ProcessLost: naming the processes whose value did not arrive within timeout_s.
  """
  client = _client()
  if jax.process_count() == 1 or client is None:
    return [int(value)]
  client.key_value_set(f"ddae/{name}/{jax.process_index()}", str(int(value)))
  deadline = time.monotonic() + timeout_s
  values, missing = [], []
  for process in range(jax.process_count()):
    wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
      values.append(int(client.blocking_key_value_get(f"ddae/{name}/{process}", wait_ms)))
    except Exception:  # noqa: BLE001 -- jaxlib's error type for a deadline varies by version
      missing.append(process)
  if missing:
    raise ProcessLost(f"process(es) {missing} of {jax.process_count()} did not reach "
                      f"'{name}' within {timeout_s:.0f} s (process {jax.process_index()} did).")
  return values


def barrier(name: str, timeout_s: float = EXCHANGE_TIMEOUT_S) -> None:
  """Returns once every process called `barrier(name)`; ProcessLost (naming who did not) after
  timeout_s."""
  allgather_int(name, 0, timeout_s)
