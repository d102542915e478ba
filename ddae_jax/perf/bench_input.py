"""Host input throughput: ImageNet-style JPEG decode + random-resized crop + flip.

The library of `python -m ddae_jax.bench_input`; its usage and options: ddae_jax/bench_input.py.
"""

from __future__ import annotations

import concurrent.futures
import io
import time

import numpy as np
from PIL import Image

from ddae_jax.data import augment


def make_jpegs(n: int, seed: int = 0, width: int = 500, height: int = 375) -> list[bytes]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    base = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    img = np.asarray(base.resize((width, height), Image.BICUBIC), np.float32)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def measure(jpegs: list[bytes], threads: int, size: int) -> float:
  """Images per second through decode + crop + flip with `threads` threads."""
  def view(i):
    return augment.pretrain_view(jpegs[i], np.random.default_rng(i), size)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(view, range(min(32, len(jpegs)))))  # warm-up
    t = time.perf_counter()
    list(pool.map(view, range(len(jpegs))))
    return len(jpegs) / (time.perf_counter() - t)

