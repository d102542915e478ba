"""What the three protocols share: restoring the pretrained encoder, metrics, the CLI.

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

from ddae_jax import config_lib
from ddae_jax.evaluation import classifier
from ddae_jax.weights import checkpoints, pretrained


def restore_encoder(config, expected: dict, image_size: int, patch_size: int) -> dict | None:
  """The chosen encoder of config.init_dir as host arrays, fitted to `expected`.

  None when config.random_init (the randomly initialised baseline).

  Raises:
    ConfigError: no init_dir given.
    CheckpointMissing: the workdir or its checkpoint does not exist.
    CheckpointMismatch: the checkpoint holds another model size; the message
      names the expected and the found architecture and every differing shape.
  """
  if config.random_init:
    logging.warning("config.random_init: evaluating a randomly initialised encoder")
    return None
  init_dir = config.init_dir
  if not init_dir:
    raise config_lib.ConfigError(
        "config.init_dir = '' is invalid: allowed a pretraining workdir "
        "(--config.init_dir=DIR holding checkpoints/<step>/state)")
  if not epath.Path(init_dir).exists():
    raise checkpoints.CheckpointMissing(
        f"config.init_dir = {init_dir!r}: expected a pretraining workdir with "
        "checkpoints/<step>/state, found no such directory")
  step = None if config.init_step < 0 else int(config.init_step)
  found, step = pretrained.load_encoder(init_dir, config.encoder, step)
  where = f"checkpoint {init_dir} (step {step}, {config.encoder} encoder)"
  saved = pretrained.load_config(init_dir)
  if saved is not None and "model" in saved:
    where += f", pretrained as model.size={saved.model.get('size')!r}"
  params = classifier.encoder_for_classifier(found, expected, image_size, patch_size, where)
  logging.info("Restored the %s encoder of %s, step %d", config.encoder, init_dir, step)
  return params


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


def accumulate(step_fn, batches) -> dict:
  """Runs `step_fn(batch) -> sums` over all batches; returns top1, top5, loss (means), count."""
  # Summed on the host in float64: exact counts over any number of batches,
  # and no eager device op per batch beside the jitted step.
  totals = None
  for batch in batches:
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
