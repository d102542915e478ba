"""Encoders restored from run directories: both encoders, clear errors on mismatch."""

import jax
import numpy as np
import pytest

from ddae_jax import config_lib
from ddae_jax.models.vit import ViTEncoder
from ddae_jax.weights import pretrained
from ddae_jax.weights.checkpoints import CheckpointMissing


def _encoder_params(width=32, depth=2, pos_embed="sincos", seed=0):
  enc = ViTEncoder(patch_size=4, width=width, depth=depth, num_heads=4, feature_blocks=(depth,),
                   pos_embed=pos_embed)
  images = np.zeros((1, 16, 16, 3), np.float32)
  return enc, jax.tree.map(np.asarray, enc.init(jax.random.key(seed), images)["params"])


def test_save_and_load_encoder_round_trip_with_config(tmp_path):
  _, params = _encoder_params()
  config = config_lib.tiny_config()
  pretrained.save_encoder(tmp_path, params, config, step=7)
  for which in pretrained.ENCODERS:
    loaded, step = pretrained.load_encoder(tmp_path, which)
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert pretrained.load_config(tmp_path).model.size == config.model.size
  assert pretrained.describe(params) == {"width": 32, "depth": 2, "patch_size": 4,
                                         "num_patches": None}


def test_learned_position_table_starts_at_the_fixed_one():
  enc_fixed, params = _encoder_params()
  enc_learned, learned = _encoder_params(pos_embed="learned")
  assert learned["pos_embed"].shape == (1, 17, 32)
  learned = dict(learned, **{k: v for k, v in params.items()})
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  a = enc_fixed.apply({"params": params}, images)["final"]
  b = enc_learned.apply({"params": learned}, images)["final"]
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_mismatch_lists_names_and_shapes():
  _, small = _encoder_params(width=32, depth=2)
  _, other = _encoder_params(width=64, depth=3)
  with pytest.raises(pretrained.CheckpointMismatch) as err:
    pretrained.check_encoder(small, other)
  msg = str(err.value)
  assert "width 32, depth 2" in msg and "width 64, depth 3" in msg
  assert "missing from the checkpoint: block_2/attn/qkv/kernel (64, 192)" in msg
  assert "shape mismatch: patch_embed/kernel expected (48, 64), found (48, 32)" in msg
  pretrained.check_encoder(small, small)  # identical trees pass


def test_missing_workdir_and_missing_ema(tmp_path):
  with pytest.raises(CheckpointMissing, match="does not exist"):
    pretrained.load_encoder(tmp_path / "nope")
  with pytest.raises(pretrained.CheckpointMismatch, match="no momentum encoder"):
    pretrained.encoder_from_state({"params": {"encoder": {}}}, "ema")
  with pytest.raises(ValueError, match="allowed"):
    pretrained.encoder_from_state({}, "target")
