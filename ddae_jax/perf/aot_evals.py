"""The compiler's estimate of what the evaluators inside pretraining cost (config.evals).

`python -m ddae_jax.aot --config=configs/vitb.py --topology=v5e-4 --evaluator=knn`
compiles, for the slice, the evaluator's two programs as the run compiles them
(evaluation/evaluators.py): the feature forward of one batch of the bank and
of the queries, read from the abstract train state, and the k-NN scorer of a
query batch against the whole bank. From the compiler's FLOPs and bytes it
takes each program's roofline time (max(FLOPs / peak, bytes / bandwidth),
per chip) and from them the time of one evaluation. With the step's own
roofline time (compiled too, unless --step_ms gives it) that is the fraction
of a run's time the evaluator takes: one evaluation per interval of steps.
These are compiler estimates, not measurements.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from ddae_jax import config_checks, config_evals, config_lib, sharding
from ddae_jax import train_step as ts
from ddae_jax.evaluation import evaluators, input_pipeline, knn
from ddae_jax.perf import aot, flops

# Set sizes when an evaluator takes a whole split (bank_size or num_queries 0).
IMAGENET_VALIDATION_IMAGES = 50_000


def _split_images(config, split: str, limit: int = 0) -> int:
  """Images an evaluator reads from `split`: its limit, else the split's size (the
  embedded digits' own; ImageNet's otherwise, the only data a TPU estimate is for)."""
  if config.data.source == "digits":
    from ddae_jax.data import sources
    total = len(sources.digits(split, 8)[1])
  else:
    total = config.num_train_images if split == "train" else IMAGENET_VALIDATION_IMAGES
  return min(limit, total) if limit else total


def _roofline_s(compiled, devices, hbm_gbps: float) -> tuple[dict, float]:
  cost = aot.cost_analysis(compiled)
  flop, moved = cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)  # per device
  seconds = max(flop / (flops.peak_tflops(devices[0]) * 1e12), moved / (hbm_gbps * 1e9))
  return {"gflop_per_chip": round(flop / 1e9, 3), "gb_accessed_per_chip": round(moved / 1e9, 4),
          "roofline_ms": round(seconds * 1e3, 3)}, seconds


def evaluator_report(config, name: str, devices, hbm_gbps: float, step_s: float | None) -> dict:
  """The JSON line of `--evaluator=name` (module docstring); step_s: the step's roofline
  seconds, or None to compile the step for it."""
  ev = config.evals[name]
  t0 = time.perf_counter()
  config_checks.validate(config, num_devices=len(devices))
  num_images = _split_images(config, "train")
  # The slice's platform decides the attention kernel; the config is not changed.
  derived = config_lib.resolve(config, devices[0].platform, num_images)
  built = ts.build(config, devices, materialize=False, derived=derived)
  mesh, method, state = built.mesh, built.model, built.abstract
  evaluator = evaluators.KnnEvaluator(name, ev, config, method, mesh, num_images)
  size, pc, step = config.model.image_size, 1, len(devices)
  parts, total_s, sets = {}, 0.0, {}
  width = derived.width
  for role, split, limit in (("bank", ev.bank_split, ev.bank_size),
                             ("queries", ev.query_split, ev.num_queries)):
    images = _split_images(config, split, limit)
    batches = input_pipeline.num_eval_batches(images, ev.batch_size, pc)
    batch = evaluators.balanced_batch(images, batches, step)  # as KnnEvaluator sizes them
    spec = evaluator.batch_spec
    arg = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=spec),
           "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=spec),
           "mask": jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=spec)}
    row, seconds = _roofline_s(evaluator.embed.lower(state, arg).compile(), devices, hbm_gbps)
    parts[f"embed_{role}"] = dict(row, batch=batch, batches=batches)
    total_s += batches * seconds
    sets[role] = (images, batches, batch)
  images, batches, batch = sets["bank"]
  spec = evaluator.batch_spec
  feature = lambda n: {"feature": jax.ShapeDtypeStruct((n, width), jnp.float32, sharding=spec),
                       "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=spec),
                       "mask": jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=spec)}
  classes = ev.num_classes or 1000
  score = jax.jit(lambda bank, q: knn.knn_sums(ev.k, ev.temperature, classes, bank, q),
                  out_shardings=sharding.replicated(mesh))
  row, seconds = _roofline_s(score.lower(feature(batches * batch), feature(sets["queries"][2]))
                             .compile(), devices, hbm_gbps)
  parts["score"] = dict(row, batches=sets["queries"][1])
  total_s += sets["queries"][1] * seconds
  compile_s = time.perf_counter() - t0
  every = config_evals.interval_steps(ev, num_images, config.batch_size)
  if step_s is None:
    lowered, _, _ = aot.lower_step(config, "main", devices)
    _, step_s = _roofline_s(lowered.compile(), devices, hbm_gbps)
  train_s = every * step_s
  return {"evaluator": name, "kind": ev.kind, "every_steps": every,
          "bank_images": sets["bank"][0], "query_images": sets["queries"][0],
          "block_pooling": [evaluator.block, evaluator.pooling], "parts": parts,
          "roofline_s_per_evaluation": round(total_s, 3),
          "roofline_step_ms": round(step_s * 1e3, 3),
          "roofline_s_per_interval": round(train_s, 1),
          "evaluator_fraction": round(total_s / (train_s + total_s), 5) if every else 0.0,
          "compile_s": round(compile_s, 1), "estimate": "TPU compiler's cost model, not measured"}
