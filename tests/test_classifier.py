"""evaluation/classifier.py: the encoder restored for evaluation names a wrong size or a
missing run directory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddae_jax.evaluation import classifier
from ddae_jax.weights import pretrained
from ddae_jax.weights.checkpoints import CheckpointMissing


def _tiny_config(**kw):
  from ddae_jax.evaluation import config as eval_config
  c = eval_config.quickstart(eval_config.knn_config("tiny"))
  c.update(kw)
  return c


def test_wrong_model_size_or_missing_workdir_is_named(tmp_path):
  small = classifier.ViTClassifier(patch_size=4, width=32, depth=2, num_heads=2, num_classes=3)
  found = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: small.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]["encoder"])
  found.pop("pos_embed")
  found["feature_norm_1"] = {"scale": np.ones(32), "bias": np.zeros(32)}
  pretrained.save_encoder(tmp_path / "run", found)
  config = _tiny_config(init_dir=str(tmp_path / "run"))
  encoder = classifier.frozen_encoder(config)
  expected = classifier.expected_encoder(encoder, 32)
  with pytest.raises(pretrained.CheckpointMismatch) as err:
    classifier.restore_encoder(config, expected, 32, 4)
  message = str(err.value)
  assert "width 32, depth 2" in message and "expects width 64, depth 4" in message, message
  assert "block_3" in message and "feature_norm" not in message
  config.init_dir = str(tmp_path / "nowhere")
  with pytest.raises(CheckpointMissing, match="nowhere.*found no such directory"):
    classifier.restore_encoder(config, expected, 32, 4)
