r"""Host input throughput: ImageNet-style JPEG decode + random-resized crop + flip.

  python -m ddae_jax.bench_input --images=512 --threads=1,2 --step_images_per_s=6450

Makes JPEGs of ImageNet's typical size (500 x 375, quality 90, natural-image-like
smooth content plus noise) in memory, then times `augment.pretrain_view` on
them with 1..N threads. Prints one JSON line per thread count and the host
cores one accelerator needs to keep up with `--step_images_per_s`.
The library: ddae_jax/perf/input_bench.py.
"""

from absl import app

from ddae_jax.perf import input_bench

if __name__ == "__main__":
  app.run(input_bench.main)
