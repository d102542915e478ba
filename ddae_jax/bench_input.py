r"""Host input throughput: ImageNet-style JPEG decode + random-resized crop + flip.

  python -m ddae_jax.bench_input --images=512 --threads=1,2 --step_images_per_s=6450

The library: ddae_jax/perf/input_bench.py.
"""

from absl import app

from ddae_jax.perf import input_bench

if __name__ == "__main__":
  app.run(input_bench.main)
