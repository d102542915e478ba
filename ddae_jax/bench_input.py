r"""Host input throughput: ImageNet-style JPEG decode + random-resized crop + flip.

  python -m ddae_jax.bench_input --images=512 --threads=1,2 --step_images_per_s=6450

Makes JPEGs of ImageNet's typical size (500 x 375, quality 90, natural-image-like
smooth content plus noise) in memory, then times `augment.pretrain_view` on
them with 1..N threads. Prints one JSON line per thread count and the host
cores one accelerator needs to keep up with `--step_images_per_s`.
The library: ddae_jax/perf/bench_input.py.
"""

import json
import math
import os

import numpy as np
from absl import app, flags

from ddae_jax.perf import bench_input

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 512, "JPEGs to make and decode per measurement.")
flags.DEFINE_string("threads", "1,2", "Comma-separated thread counts.")
flags.DEFINE_integer("size", 224, "Crop size.")
flags.DEFINE_float("step_images_per_s", 0.0, "Train-step rate to size the host for.")


def main(argv):
  del argv
  jpegs = bench_input.make_jpegs(FLAGS.images)
  per_core = None
  for threads in (int(t) for t in FLAGS.threads.split(",")):
    rate = bench_input.measure(jpegs, threads, FLAGS.size)
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


if __name__ == "__main__":
  app.run(main)
