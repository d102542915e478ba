"""The protocols end to end on tiny models: restore, train steps, evaluation, k-NN votes.

One subprocess run of a binary (linear_probe); the rest runs in-process on
the 8 fake CPU devices.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_utils

from ddae_jax import config_lib
from ddae_jax.evaluation import classifier, finetune, knn, linear_probe
from ddae_jax.evaluation import config as eval_config
from ddae_jax.models.vit import sincos_pos_embed
from ddae_jax.weights import pretrained

IMAGE = 16


def _config(protocol, init_dir, **overrides):
  c = eval_config.quickstart(eval_config.BUILDERS[protocol]("tiny"))
  c.model.image_size = IMAGE
  c.init_dir = str(init_dir)
  c.batch_size = c.eval_batch_size = 16
  c.data.workers = 1
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
  """A pretraining-layout checkpoint of a random tiny encoder (with feature norms)."""
  workdir = tmp_path_factory.mktemp("pretrain")
  encoder = classifier.frozen_encoder(_config("knn", workdir))
  rng = np.random.default_rng(7)  # random values on the shapes: no init program to compile
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05 + (s.ndim == 1)).astype(
      np.float32), classifier.expected_encoder(encoder, IMAGE))
  params.pop("pos_embed")  # pretraining runs hold the fixed sin-cos table, not a parameter
  params["feature_norm_2"] = {"scale": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)}
  pretrained.save_encoder(workdir, params)
  return workdir, params


def test_finetune_restores_the_encoder_and_takes_sharded_steps(pretrained_dir):
  workdir, params = pretrained_dir
  config = _config("finetune", workdir, **{"aug.randaug_ops": 0})
  built = finetune.build(config, steps=config_lib.steps(config, 64))
  state = built.state
  encoder = jax.device_get(state["params"]["encoder"])
  np.testing.assert_array_equal(encoder["block_1"]["attn"]["qkv"]["kernel"],
                                params["block_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_allclose(encoder["pos_embed"][0], sincos_pos_embed(64, (4, 4)))
  assert "feature_norm_2" not in encoder and "fc_norm" in state["params"]
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, IMAGE, IMAGE, 3), np.uint8),
           "label": rng.integers(0, 10, 16).astype(np.int32),
           "erase": np.tile(np.asarray([[2, 3, 5, 4]], np.int32), (16, 1))}
  batch = jax.device_put(batch, built.batch_sharding)
  losses = []
  for _ in range(2):
    state, metrics = built.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and int(state["step"]) == 2
  moved = jax.device_get(state["params"]["encoder"]["patch_embed"]["kernel"])
  assert not np.allclose(moved, params["patch_embed"]["kernel"])  # the encoder trains too
  sums = built.eval_step(state, dict(batch, mask=jax.device_put(
      np.arange(16) < 11, built.batch_sharding)))
  assert float(sums["count"]) == 11


def _numpy_knn(queries, bank, bank_labels, k, t, classes):
  votes = np.zeros((len(queries), classes))
  for i, q in enumerate(queries):
    sims = bank @ q
    for j in np.argsort(-sims)[:k]:
      votes[i, bank_labels[j]] += np.exp(sims[j] / t)
  return votes


def test_knn_votes_match_numpy_and_padding_never_votes():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  queries, bank = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(30, 8)))
  labels = rng.integers(0, 4, 30)
  mask = np.arange(30) < 26
  bank[26:] = queries[0]  # padding rows identical to a query: they must not count
  got = knn.knn_votes(jnp.asarray(queries, jnp.float32), jnp.asarray(bank, jnp.float32),
                      jnp.asarray(labels), jnp.asarray(mask), 6, 0.07, 4)
  ref = _numpy_knn(queries, bank[:26], labels[:26], 6, 0.07, 4)
  np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_knn_evaluates_every_test_digit_once(pretrained_dir):
  workdir, _ = pretrained_dir
  config = _config("knn", workdir, **{"knn.k": 5})
  results = knn.evaluate(config)
  assert results["count"] == 300  # the digits test split, 300 = 18 x 16 + 12
  assert 0.1 < results["top1"] <= results["top5"] <= 1.0


def test_linear_probe_binary_trains_evaluates_and_checkpoints(pretrained_dir, tmp_path):
  workdir, _ = pretrained_dir
  cmd = [sys.executable, "-m", "ddae_jax.linear_probe",
         f"--config={os.path.join(trainer_utils.REPO, 'configs/linear_probe_quickstart.py')}",
         f"--workdir={tmp_path / 'lin'}", f"--config.init_dir={workdir}",
         f"--config.model.image_size={IMAGE}", "--config.batch_size=32",
         "--config.eval_batch_size=32", "--config.epochs=0.05", "--config.optim.warmup_epochs=0",
         "--config.encoder=online", "--config.model.pooling=avg"]
  proc = trainer_utils.run(cmd, devices=2)
  assert proc.returncode == 0, proc.stdout[-3000:]
  results = json.loads((tmp_path / "lin" / "results.json").read_text())
  assert results["count"] == 300 and results["step"] == 2
  assert sorted(os.listdir(tmp_path / "lin" / "checkpoints")) == ["2"]
  # Rerun in-process (8 devices now): restores step 2 onto this mesh, trains no
  # further, and evaluates the restored probe to the same figures.
  config = _config("linear_probe", workdir, batch_size=32, eval_batch_size=32, epochs=0.05,
                   encoder="online", **{"model.pooling": "avg", "optim.warmup_epochs": 0.0})
  resumed = linear_probe.train_and_evaluate(config, str(tmp_path / "lin"))
  assert resumed["count"] == 300
  assert resumed["top1"] == pytest.approx(results["top1"])
  assert resumed["loss"] == pytest.approx(results["loss"], rel=1e-4)
