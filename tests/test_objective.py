"""Eq. 3, 5, 6 on small cases against direct NumPy transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
from references import mae_loss_numpy

from ddae_jax.objectives import ddae as objective
from ddae_jax.objectives import dynamic_weights as dw
from ddae_jax.objectives import masking


def test_uniform_single_block_loss_is_mae_norm_pix_loss():
  rs = np.random.RandomState(0)
  images = rs.randn(4, 16, 16, 3).astype(np.float32)
  mask = np.asarray(masking.random_mask(jax.random.PRNGKey(0), 4, (4, 4), 0.75))
  pred = rs.randn(4, 1, 16, 48).astype(np.float32)
  target = objective.pixel_targets(jnp.asarray(images), 4, norm_pix=True)
  weights = jnp.asarray(mask, jnp.float32)[:, None]
  per_block = objective.weighted_block_losses(
      objective.per_patch_error(jnp.asarray(pred), target), weights, jnp.asarray(mask),
      "num_masked")
  got = float(objective.deep_loss(per_block, (1.0,)))
  want = mae_loss_numpy(images.transpose(0, 3, 1, 2), pred[:, 0], mask, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_eq3_and_eq6_against_transcription():
  """L = sum_i lambda_i mean_b(sum_n w * err / #masked) + lam * sum_i mean_b ||h_i||."""
  rs = np.random.RandomState(1)
  grid, k = (6, 6), 3
  mask = np.asarray(masking.blockwise_mask(jax.random.PRNGKey(1), 5, grid, 0.75,
                                           min_patches=4))
  dist = np.asarray(dw.distance_map(mask, grid)).astype(np.float64)
  beta = np.asarray([-0.5, 0.3, -1.0])
  lam = np.asarray([0.75, 0.75, 1.0])
  err = rs.rand(5, k, 36)
  want = 0.0
  reg = 0.0
  for i in range(k):
    for b in range(5):
      m = mask[b]
      h = np.zeros(36)
      h[m] = np.exp(dist[b][m] ** beta[i]) / np.exp(dist[b][m] ** beta[i]).sum()
      w = h / h.max()
      want += lam[i] * (w * err[b, i]).sum() / m.sum() / 5
      reg += np.sqrt((h ** 2).sum()) / 5
  want += 0.5 * reg
  b32 = jnp.asarray(beta, jnp.float32)
  weights = dw.loss_weights(jnp.asarray(dist, jnp.float32), jnp.asarray(mask), b32)
  per_block = objective.weighted_block_losses(jnp.asarray(err, jnp.float32), weights,
                                              jnp.asarray(mask), "num_masked")
  norms = dw.weight_l2_norm(jnp.asarray(dist, jnp.float32), jnp.asarray(mask), b32)
  got = objective.total_loss(objective.deep_loss(per_block, lam), 0.0, norms, 0.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_feature_targets_layernorm_and_no_gradient():
  rs = np.random.RandomState(2)
  hidden = jnp.asarray(rs.randn(2, 3, 5, 8).astype(np.float32))
  out = {"hidden": hidden, "features": hidden * 2}
  t = np.asarray(objective.feature_targets(out, "layernorm"))
  h = np.asarray(hidden)[:, :, 1:]
  want = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(t, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(objective.feature_targets(out, "features"),
                                np.asarray(hidden)[:, :, 1:] * 2)
  g = jax.grad(lambda x: objective.feature_targets({"hidden": x}, "none").sum())(hidden)
  assert np.all(np.asarray(g) == 0)
