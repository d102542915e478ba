"""Classification scores of a padded, sharded validation set, and where they are written.

`classification_sums` turns logits of a padded batch into masked sums
(correct top-1, top-5, loss, count), summed over the whole global batch by
the jitted step, so accuracies count every validation example exactly once.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
  """Masked sums over a batch: correct top-1 and top-5, cross-entropy, count.

  Args:
    logits: float32[B, C]; labels: int32[B]; mask: bool[B] (False = padding).
  """
  m = mask.astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit5 = (top5 == labels[:, None]).any(axis=-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"top1": ((jnp.argmax(logits, -1) == labels) * m).sum(),
          "top5": (hit5 * m).sum(), "loss": (loss * m).sum(), "count": m.sum()}


def accumulate(step_fn, batches, stop=None) -> dict | None:
  """Runs `step_fn(batch) -> sums` over all batches; returns top1, top5, loss (means), count.

  Args:
    stop: () -> bool, asked before each batch (runtime.StopDecision.poll, for
      an evaluation inside a training loop); True abandons the pass.

  Returns:
    the scores, or None when `stop` abandoned the pass.
  """
  # Summed on the host in float64: exact counts over any number of batches,
  # and no eager device op per batch beside the jitted step.
  totals = None
  for batch in batches:
    if stop is not None and stop():
      return None
    sums = {k: np.float64(v) for k, v in jax.device_get(step_fn(batch)).items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  totals = {k: float(v) for k, v in totals.items()}
  n = max(totals["count"], 1.0)
  return {"top1": totals["top1"] / n, "top5": totals["top5"] / n,
          "loss": totals["loss"] / n, "count": totals["count"]}


def log_eval(writer, step: int, results: dict, prefix: str = "eval") -> None:
  writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in results.items()})
  writer.flush()
  logging.info("%s at step %d: top-1 %.4f, top-5 %.4f, loss %.4f over %d examples", prefix,
               step, results["top1"], results["top5"], results["loss"], results["count"])


def write_results(workdir, results: dict) -> None:
  """Final figures as <workdir>/results.json (process 0), for scripts and the README."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
