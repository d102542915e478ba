"""Host input throughput: ImageNet-style JPEG decode + random-resized crop + flip.

The library of `python -m ddae_jax.bench_input`; its usage and options: ddae_jax/bench_input.py.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import time

import numpy as np
from absl import flags
from PIL import Image

from ddae_jax.data import augment

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 512, "JPEGs to make and decode per measurement.")
flags.DEFINE_string("threads", "1,2", "Comma-separated thread counts.")
flags.DEFINE_integer("size", 224, "Crop size.")
flags.DEFINE_float("step_images_per_s", 0.0, "Train-step rate to size the host for.")


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


def main(argv):
  del argv
  jpegs = make_jpegs(FLAGS.images)
  per_core = None
  for threads in (int(t) for t in FLAGS.threads.split(",")):
    rate = measure(jpegs, threads, FLAGS.size)
    if threads == 1:
      per_core = rate
    row = {"threads": threads, "images_per_s": round(rate, 1),
           "images_per_s_per_thread": round(rate / threads, 1),
           "host_cores": os.cpu_count(), "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs]))}
    print(json.dumps(row), flush=True)
  if FLAGS.step_images_per_s and per_core:
    print(json.dumps({"step_images_per_s": FLAGS.step_images_per_s,
                      "host_cores_needed": math.ceil(FLAGS.step_images_per_s / per_core)}),
          flush=True)

