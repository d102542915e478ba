"""Weighted k-NN classification on frozen features (DINO's protocol): a quick proxy.

The library of `python -m ddae_jax.knn`; its usage and options: ddae_jax/knn.py.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from ddae_jax import config_lib, metrics, sharding
from ddae_jax.data.normalize import normalize_images
from ddae_jax.evaluation import classifier, input_pipeline, loop, scoring


def embed(encoder, pooling, params, batch) -> dict:
  """{"image", "label", "mask"} -> {"feature": float32[B, D] unit norm, "label", "mask"}."""
  f = classifier.frozen_features(encoder, params, normalize_images(batch["image"]), pooling)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return {"feature": f, "label": batch["label"], "mask": batch["mask"]}


def knn_votes(queries: jax.Array, bank: jax.Array, bank_labels: jax.Array,
              bank_mask: jax.Array, k: int, temperature: float, num_classes: int) -> jax.Array:
  """DINO's weighted votes.

  Args:
    queries: float32[B, D], unit norm. bank: float32[N, D], unit norm.
    bank_labels: int32[N]. bank_mask: bool[N] (False: padding, never a neighbour).

  Returns:
    float32[B, num_classes]: sum over the k nearest of exp(cos / T) per class.
  """
  sims = jnp.where(bank_mask[None, :], queries @ bank.T, -jnp.inf)
  top_sims, idx = jax.lax.top_k(sims, k)
  weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
  return (jax.nn.one_hot(bank_labels[idx], num_classes) * weights[..., None]).sum(axis=1)


def knn_sums(k, temperature, num_classes, bank, batch) -> dict:
  votes = knn_votes(batch["feature"], bank["feature"], bank["label"], bank["mask"], k,
                    temperature, num_classes)
  share = votes / jnp.maximum(votes.sum(-1, keepdims=True), 1e-30)
  return scoring.classification_sums(jnp.log(share + 1e-8), batch["label"], batch["mask"])


def evaluate(config, devices=None) -> dict:
  """Top-1, top-5, loss and count of the k-NN classifier on config.data.eval_split."""
  mesh, batch_spec = loop.setup(config, devices)  # validates the config, makes the mesh
  block, pooling = classifier.frozen_readout(config)
  encoder = classifier.frozen_encoder(config, block)
  params = classifier.frozen_encoder_params(config, encoder, mesh)
  embed_fn = jax.jit(functools.partial(embed, encoder, pooling), out_shardings=batch_spec)
  n_train, batches = input_pipeline.eval_loader(config, config.data.train_split, batch_spec,
                                                config.batch_size)
  parts = [embed_fn(params, b) for b in batches]
  # The bank stays split over the devices along its rows, as the batches were.
  bank = jax.jit(lambda p: jax.tree.map(lambda *xs: jnp.concatenate(xs), *p),
                 out_shardings=batch_spec)(parts)
  logging.info("k-NN bank: %d training images (%d rows with padding)", n_train,
               bank["mask"].shape[0])
  if config.knn.k > n_train:
    raise config_lib.ConfigError(
        f"config.knn.k = {config.knn.k} is invalid: allowed at most the {n_train} "
        "training images")
  score = jax.jit(functools.partial(knn_sums, config.knn.k, config.knn.temperature,
                                    config.model.num_classes),
                  out_shardings=sharding.replicated(mesh))
  _, val = input_pipeline.eval_loader(config, config.data.eval_split, batch_spec)
  return scoring.accumulate(lambda b: score(bank, embed_fn(params, b)), val)


def run(config, workdir: str) -> dict:
  results = evaluate(config)
  writer = metrics.create_writer(str(workdir))
  writer.write_hparams(config.to_dict())
  scoring.log_eval(writer, 0, results, prefix="knn")
  writer.close()
  scoring.write_results(workdir, results)
  return results

