"""evaluation/input_pipeline.py with evaluation/scoring.py: the validation set split over
processes, padded and masked, counts every example once on an 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddae_jax.evaluation import input_pipeline, scoring
from ddae_jax.sharding import batch_sharding, make_mesh


@pytest.mark.parametrize("n", [1, 37, 64, 131])
def test_evaluation_counts_every_example_once_on_8_devices(n):
  mesh = make_mesh((("data", 4), ("fsdp", 2)))
  spec = batch_sharding(mesh)
  global_batch, classes = 16, 7
  labels = np.arange(n) % classes
  # Logits that are right on exactly the examples with an even index.
  step = jax.jit(lambda b: scoring.classification_sums(
      jax.nn.one_hot(jnp.where(b["label"] >= 0, b["image"][:, 0, 0, 0].astype(jnp.int32), 0),
                     classes) * 5.0, b["label"], b["mask"]))
  for processes in (1, 3):
    shares = [input_pipeline.split_for_process(n, p, processes) for p in range(processes)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    batches = input_pipeline.num_eval_batches(n, global_batch, processes)
    assert all(batches * (global_batch // processes) >= len(s) for s in shares)
  predicted = np.where(np.arange(n) % 2 == 0, labels, (labels + 1) % classes)
  examples = ((np.full((4, 4, 3), predicted[i], np.uint8), int(labels[i])) for i in range(n))
  results = scoring.accumulate(step, input_pipeline.eval_batches(
      examples, input_pipeline.num_eval_batches(n, global_batch, 1), global_batch, spec,
      image_size=4, crop_ratio=1.0, workers=1))
  assert results["count"] == n
  assert results["top1"] == pytest.approx(np.mean(np.arange(n) % 2 == 0))
