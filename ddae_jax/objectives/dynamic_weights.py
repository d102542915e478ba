"""Section 3.2: the distance map and the dynamic loss weights of eq. 2.

The distance map D gives each masked patch its Euclidean distance, on the
patch grid, to the nearest visible patch (0 for visible patches); it measures
how hard a patch is to reconstruct. Eq. 2 turns it into loss weights with one
learnable exponent beta per supervised block:

  h(m_i | beta) = exp(D_i^beta) / sum_{m_j = 1} exp(D_j^beta)   if m_i = 1
                = 0                                             if m_i = 0

beta < 0 favours patches close to visible ones (easy), beta > 0 far ones (hard).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def distance_map(mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Exact Euclidean distance transform on the patch grid.

  Brute force over all (patch, visible patch) pairs: N^2 = 38k pairs for a
  14x14 grid, negligible next to the encoder, and exact (the squared distances
  are integers), so it equals `scipy.ndimage.distance_transform_edt(mask)`.

  Args:
    mask: bool[B, N] in raster order, True = masked; each row needs a visible patch.
    grid: (rows, cols) with rows * cols = N.

  Returns:
    float32[B, N]: distance to the nearest visible patch, 0 on visible patches.
  """
  rows, cols = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
  coords = jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)  # [N, 2]
  sq = jnp.sum((coords[:, None, :] - coords[None, :, :]) ** 2, axis=-1)  # [N, N]
  big = jnp.iinfo(jnp.int32).max
  # For every patch i, the nearest patch j that is visible.
  sq_to_visible = jnp.where(mask[:, None, :], big, sq[None, :, :])  # [B, N, N]
  nearest = jnp.min(sq_to_visible, axis=-1)
  return jnp.sqrt(nearest.astype(jnp.float32))


def _distance_power(distance: jax.Array, mask: jax.Array, beta: jax.Array):
  """D^beta on masked patches (D >= 1 there), 1 elsewhere. beta: [K] -> [B, K, N]."""
  # Visible patches have D = 0, where 0^beta is inf for beta < 0: use 1 and
  # zero them out afterwards, so neither the value nor its gradient is NaN.
  safe = jnp.where(mask, distance, 1.0)
  return jnp.exp(beta[None, :, None] * jnp.log(safe)[:, None, :])


def dynamic_weights(distance: jax.Array, mask: jax.Array, beta: jax.Array) -> jax.Array:
  """Eq. 2: h(m | beta), a distribution over each image's masked patches.

  Args:
    distance: float32[B, N], the distance map.
    mask: bool[B, N], True = masked.
    beta: float32[K], one exponent per supervised block.

  Returns:
    float32[B, K, N]; each [b, k, :] sums to 1 over masked patches, 0 on visible.
  """
  logits = jnp.where(mask[:, None, :], _distance_power(distance, mask, beta), -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def loss_weights(distance: jax.Array, mask: jax.Array, beta: jax.Array) -> jax.Array:
  """Eq. 2 rescaled into [0, 1] by each image's max, as the loss uses it.

  h / max(h) = exp(D^beta - max_j D_j^beta): the normaliser of eq. 2 cancels,
  so the rescaled weights are computed directly (no underflow for large D^beta).

  Returns:
    float32[B, K, N]: 1 on the patches eq. 2 favours most, in (0, 1] on the other
    masked patches, 0 on visible ones.
  """
  power = _distance_power(distance, mask, beta)
  top = jnp.max(jnp.where(mask[:, None, :], power, -jnp.inf), axis=-1, keepdims=True)
  return jnp.where(mask[:, None, :], jnp.exp(power - top), 0.0)


def weight_l2_norm(distance: jax.Array, mask: jax.Array, beta: jax.Array) -> jax.Array:
  """||h_beta(m)||_2 per block and image, the regulariser of eq. 6. -> float32[B, K].

  Minimal (1 / sqrt(#masked)) for uniform weights, so it pulls beta towards 0.
  """
  h = dynamic_weights(distance, mask, beta)
  return jnp.sqrt(jnp.sum(jnp.square(h), axis=-1))
