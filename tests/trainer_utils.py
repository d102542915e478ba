"""Helpers for tests that run the pretraining binary in subprocesses."""

import glob
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import FAST_COMPILE
from repo_paths import REPO


def env(devices: int, tensorboard: bool = False, extra: dict | None = None) -> dict:
  """The subprocess environment; `extra` adds variables (e.g. a local GCS server's)."""
  # PYTHONPATH: the subprocess imports this checkout, whatever is pip-installed.
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  if not tensorboard:
    e["DDAE_NO_TENSORBOARD"] = "1"
  e.update(extra or {})
  return e


def main_cmd(workdir, *overrides, config="configs/tiny.py"):
  return [sys.executable, "-m", "ddae_jax.main", f"--config={os.path.join(REPO, config)}",
          f"--workdir={workdir}", *overrides]


class Started(subprocess.Popen):
  """A background run whose output goes to a file (a pipe nobody reads would block it)."""

  def output(self) -> str:
    with open(self.log_path) as f:
      return f.read()


def start(cmd, devices, log_path=None, extra_env=None, **kw):
  """Starts `cmd`; its output goes to `log_path` (default: beside the --workdir)."""
  if log_path is None:
    log_path = cmd[4].split("=", 1)[1].rstrip("/") + f".{len(cmd)}.{os.getpid()}.log"
  log = open(log_path, "a")
  proc = Started(cmd, cwd=REPO, env=dict(env(devices, **kw), **(extra_env or {})), stdout=log,
                 stderr=subprocess.STDOUT, text=True)
  proc.log_path = log_path
  return proc


def start_processes(workdir, *overrides, devices=1, cache_dir=None, n=2,
                    config="configs/tiny.py"):
  """`n` processes of main forming one run through jax.distributed on 127.0.0.1.

  Each logs to its own file (f"{workdir}.{launch}.p{i}.log", `launch` counting
  the launches in this workdir). `cache_dir`: JAX's persistent compilation
  cache, one folder per process (a later launch of the same program loads
  its executables instead of compiling them).
  """
  port, launch = free_port(), len(glob.glob(f"{workdir}.*.p0.log"))
  procs = []
  for i in range(n):
    cache = {} if cache_dir is None else {
        "JAX_COMPILATION_CACHE_DIR": os.path.join(cache_dir, f"p{i}"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = main_cmd(workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={n}", f"--process_id={i}", config=config)
    procs.append(start(cmd, devices, log_path=f"{workdir}.{launch}.p{i}.log", extra_env=cache))
  return procs


def run_script_processes(script: str, *args, n=2, timeout=120) -> list[tuple[int, str]]:
  """`python -c script PROCESS_ID PORT *args` as `n` processes on one CPU device each.

  Returns:
    (exit status, output) of each process, in process order.
  """
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(port), *map(str, args)],
                            cwd=REPO, env=env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(n)]
  out = []
  for p in procs:
    try:
      out.append((p.wait(timeout=timeout), p.stdout.read()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return out


def run(cmd, devices, timeout=600, **kw):
  proc = subprocess.run(cmd, cwd=REPO, env=env(devices, **kw), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout)
  return proc


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def load_state(workdir, step, config_overrides=None):
  """The checkpointed train state of `step` as NumPy arrays, on this process's device."""
  from helpers import tiny

  from ddae_jax import runtime
  from ddae_jax import train_step as ts
  from ddae_jax.weights import checkpoints
  config = tiny()
  for key, value in (config_overrides or {}).items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  built = ts.build(config, jax.devices()[:1])
  abstract = runtime.with_shardings(built.state, built.shardings)
  manager = checkpoints.open_manager(os.path.join(workdir, "checkpoints"), read_only=True)
  out = manager.restore(step, args=checkpoints.restore_args(abstract))
  manager.close()
  return jax.tree.map(np.asarray, out["state"]), out["data"]


def checkpoint_arrays(workdir, step):
  """({tree path: NumPy array} of checkpoint `step`'s state, its input positions).

  Read into this process's first device from the checkpoint's own metadata:
  no model is built, whatever the process count that wrote it.
  """
  from ddae_jax.weights import checkpoints
  manager = checkpoints.open_manager(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            manager.item_metadata(step)[checkpoints.STATE])
    out = manager.restore(step, args=checkpoints.restore_args(abstract))
  finally:
    manager.close()
  arrays = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(out[checkpoints.STATE])}
  return arrays, out[checkpoints.DATA]


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())
