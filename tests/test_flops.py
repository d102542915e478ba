"""perf/flops.py: the analytic FLOP count against XLA's cost analysis, the peak table, and the
byte floor."""

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax import config_lib
from ddae_jax.methods.ddae import DDAE
from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import make_mask
from ddae_jax.perf import flops


def _small_config():
  c = config_lib.base_config()
  c.model.size, c.model.image_size, c.model.dtype = "small", 96, "float32"
  return c


def test_forward_flops_match_xla_cost_analysis():
  """XLA counts every op; matrix products dominate, so the two agree within ~10%."""
  c = _small_config()
  model = DDAE(c, config_lib.resolve(c))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  batch = 2
  images = jax.ShapeDtypeStruct((batch, 96, 96, 3), jnp.float32)

  def forward(params, images):
    mask = make_mask(jax.random.PRNGKey(0), batch, model.grid, 0.75, "blockwise")
    ema = model.encode(params["encoder"], images)
    return model.loss(params, images, mask, distance_map(mask, model.grid), ema)[0]

  cost = jax.jit(forward).lower(params, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = sum(flops.forward_flops_per_image(c, config_lib.resolve(c)).values()) * batch
  ratio = analytic / cost["flops"]
  assert 0.85 < ratio < 1.02, (analytic, cost["flops"])


def test_vitb_step_cost_matches_the_published_estimate():
  """PEERS.md: about 160 GFLOP per image for DDAE ViT-B/16, K = 4."""
  c = config_lib.base_config()
  parts = flops.train_flops_per_image(c, config_lib.resolve(c))
  assert 150e9 < parts["total"] < 175e9
  np.testing.assert_allclose(parts["encoder"], 25.8e9, rtol=0.02)
  np.testing.assert_allclose(parts["momentum_encoder"], 34.9e9, rtol=0.02)
  # MAE ViT-B (8 x 512 decoder, one pass, no distillation): PEERS.md counts 58.8.
  c.dds.deep_supervision, c.dds.dynamic, c.distill.enabled = False, False, False
  c.pixel.decoder_depth, c.masking.kind = 8, "random"
  assert 55e9 < flops.train_flops_per_image(c, config_lib.resolve(c))["total"] < 62e9


def test_peak_table_knows_the_chips():
  class Dev:
    def __init__(self, kind):
      self.device_kind = kind
  assert flops.peak_tflops(Dev("NVIDIA H100 80GB HBM3")) == 989.0
  assert flops.peak_tflops(Dev("NVIDIA H200")) == 989.0
  assert flops.peak_tflops(Dev("NVIDIA A100-SXM4-80GB")) == 312.0
  assert flops.peak_tflops(Dev("TPU v4")) == 275.0
  assert flops.peak_tflops(Dev("TPU v5 lite")) == 197.0
  assert flops.peak_tflops(Dev("TPU v5p")) == 459.0
  assert flops.peak_tflops(Dev("cpu")) is None


def test_block_bytes_at_the_fusion_floor_by_hand():
  """2 tokens, width 4, 2 heads, MLP 16, weights read for one image, bfloat16: qkv
  2 (2 (4 + 12) + 48), proj 2 (2 (4 + 4) + 16), fc1 and fc2 2 (2 (4 + 16) + 64) each,
  attention 2 (4 * 2 * 4 + 2 * 2 * 2 * 2)."""
  assert flops.block_bytes(2, 4, 2, weight_share=1) == 160 + 64 + 208 + 208 + 96
  # Sharing the weights over more images only removes weight traffic.
  assert flops.block_bytes(2, 4, 2, weight_share=2) == 736 - (48 + 16 + 64 + 64) * 2 / 2
  # Attention fused into one kernel: the [heads, T, T] logits are neither written nor read.
  assert flops.block_bytes(2, 4, 2, weight_share=1, fused_attention=True) == 736 - 2 * 16


def test_floor_counts_the_models_parameters_in_the_optimizer_term():
  """The update's traffic is 32 bytes per trained parameter and 8 per momentum-encoder
  parameter; the formula's counts match the model's own tree (norms, biases and the
  class token aside, < 1%)."""
  c = config_lib.base_config()
  params = jax.eval_shape(DDAE(c, config_lib.resolve(c)).init, jax.random.PRNGKey(0))
  size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  trained = size({k: v for k, v in params.items() if k != "beta"})
  expected = flops.TRAINED_PARAM_BYTES * trained + flops.MOMENTUM_PARAM_BYTES * size(
      params["encoder"])
  parts = flops.floor_bytes_per_image(c, config_lib.resolve(c), per_chip_batch=64)
  np.testing.assert_allclose(parts["optimizer"] * 64, expected, rtol=0.01)
  assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
  # The MAE row has no momentum encoder and no distillation decoder.
  c.dds.deep_supervision, c.dds.dynamic, c.distill.enabled = False, False, False
  assert set(flops.floor_bytes_per_image(c, config_lib.resolve(c), 64)) == {
      "encoder", "pixel_decoder", "optimizer", "total"}
