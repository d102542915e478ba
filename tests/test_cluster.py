"""cluster: the host-side exchanges of a multi-process run, each with a deadline (issue 27)."""

import re

import trainer_utils as tu

from ddae_jax import cluster


def test_one_process_exchanges_return_at_once():
  assert cluster.allgather_int(cluster.unique_name("positions"), 7) == [7]
  cluster.barrier(cluster.unique_name("set_aside"))
  assert cluster.unique_name("a") != cluster.unique_name("a")  # a new name each call


# Process 1 skips two exchanges that process 0 enters with a 3 s deadline.
_SKIPPED_EXCHANGES = r'''
import sys, time
import jax
from ddae_jax import cluster
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
print("gathered", cluster.allgather_int("positions/0", 10 * pid + 3), flush=True)
if pid == 0:
  for call in (lambda: cluster.allgather_int("positions/1", 5, timeout_s=3),
               lambda: cluster.barrier("set_aside", timeout_s=3)):
    start = time.monotonic()
    try:
      call()
    except cluster.ProcessLost as err:
      print(f"lost after {time.monotonic() - start:.1f} s: {err}", flush=True)
cluster.barrier("end", timeout_s=120)
'''


def test_an_exchange_a_process_skips_fails_at_its_deadline_naming_that_process():
  (rc0, out0), (rc1, out1) = tu.run_script_processes(_SKIPPED_EXCHANGES)
  assert rc0 == 0 and rc1 == 0, out0[-2000:] + out1[-2000:]
  assert "gathered [3, 13]" in out0 and "gathered [3, 13]" in out1
  lost = re.findall(r"lost after ([\d.]+) s: process\(es\) \[1\] of 2 did not reach "
                    r"'(positions/1|set_aside)' within 3 s", out0)
  assert [name for _, name in lost] == ["positions/1", "set_aside"], out0[-2000:]
  assert all(3.0 <= float(seconds) < 30.0 for seconds, _ in lost), lost
