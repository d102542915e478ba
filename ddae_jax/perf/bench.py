"""Times the jitted train step on synthetic on-device data; one JSON line per run.

The library of `python -m ddae_jax.bench`; its usage and options: ddae_jax/bench.py.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax import sharding
from ddae_jax import train_step as ts
from ddae_jax.perf import flops


def synthetic_batch(config, mesh):
  """uint8 images made on the devices, already sharded like a real batch."""
  size = config.model.image_size
  shape = (config.batch_size, size, size, 3)
  make = jax.jit(lambda k: jax.random.randint(k, shape, 0, 256, jnp.int32).astype(jnp.uint8),
                 out_shardings=sharding.batch_sharding(mesh))
  return {"image": make(jax.random.PRNGKey(0))}


def peak_memory_bytes() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and None not in peaks else None


def run_once(config, steps: int, warmup: int) -> dict:
  built = ts.build(config)
  state, step = built.state, built.step
  batch = synthetic_batch(config, built.mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)

  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  pipelined = (time.perf_counter() - t) / steps

  per_image = flops.train_flops_per_image(config, built.model.derived)
  images_per_s = config.batch_size / pipelined
  achieved = images_per_s * per_image["total"] / 1e12
  peak = flops.peak_tflops()
  ms = np.asarray(times) * 1e3
  memory = peak_memory_bytes()
  return {
      "config": f"{config.model.size}/{config.model.patch_size}",
      "batch": config.batch_size,
      "devices": jax.device_count(),
      "chip": jax.devices()[0].device_kind,
      "dtype": config.model.dtype,
      "step_ms_median": round(float(np.median(ms)), 3),
      "step_ms_p10": round(float(np.percentile(ms, 10)), 3),
      "step_ms_p90": round(float(np.percentile(ms, 90)), 3),
      "step_ms_pipelined": round(pipelined * 1e3, 3),
      "images_per_s": round(images_per_s, 1),
      "gflops_per_image": round(per_image["total"] / 1e9, 2),
      "achieved_tflops": round(achieved, 2),
      "mfu": round(achieved / (peak * jax.device_count()), 4) if peak else None,
      "peak_memory_gb": round(memory / 2**30, 2) if memory is not None else None,
      "compile_s": round(compile_s, 1),
      "loss": float(metrics["loss"]),
      "jax": jax.__version__,
  }


def is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "OOM" in text

