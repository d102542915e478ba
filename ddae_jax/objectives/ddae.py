"""The DDAE objective: eq. 3 (pixels), eq. 5 (self-distillation), eq. 6 (total).

All per-patch errors here are l2 distances M(a, b) = ||a - b||^2 averaged over
the patch's channels (MAE's convention), laid out [batch, K, patches] with K
the supervised blocks g_1 < ... < g_K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddae_jax.models.vit import patchify

NORMALIZERS = ("num_masked", "weight_sum")
TARGET_NORMS = ("layernorm", "features", "none")


def pixel_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
  """The regression targets x_M: [B, H, W, C] -> [B, N, patch * patch * C].

  With norm_pix, each patch is standardised by its own mean and variance, as in
  MAE's norm_pix_loss (unbiased variance, eps 1e-6 inside the square root).
  """
  target = patchify(images.astype(jnp.float32), patch)
  if not norm_pix:
    return target
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + 1e-6)


def feature_targets(ema_out: dict, kind: str) -> jax.Array:
  """The self-distillation targets f_theta'^(g_i), patch tokens only.

  Args:
    ema_out: the momentum encoder's output on all patches (see ViTEncoder).
    kind: "layernorm": the raw block outputs standardised per token without
      affine parameters (scale-free targets for every depth); "features": the
      same normalised features the online encoder feeds its decoders; "none":
      the raw block outputs.

  Returns:
    float32[B, K, N, D], without gradient.
  """
  if kind == "features":
    target = ema_out["features"]
  else:
    target = ema_out["hidden"]
  target = target[:, :, 1:].astype(jnp.float32)
  if kind == "layernorm":
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
  elif kind not in TARGET_NORMS:
    raise ValueError(f"distill.target_norm must be one of {TARGET_NORMS}, got {kind!r}")
  return jax.lax.stop_gradient(target)


def per_patch_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """||pred - target||^2 averaged over channels: [B, K, N, C] x [B, (K,) N, C] -> [B, K, N]."""
  if target.ndim == pred.ndim - 1:
    target = target[:, None]
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


def weighted_block_losses(error: jax.Array, weights: jax.Array, mask: jax.Array,
                          normalizer: str) -> jax.Array:
  """h_beta_i(m) ⊙ ||d(f^(g_i)) - target||^2 reduced per block: the terms of eq. 3 and 5.

  Args:
    error: float32[B, K, N], per-patch errors.
    weights: float32[B, K, N], loss weights (eq. 2 rescaled to [0, 1], or the
      mask itself for uniform weights); 0 on visible patches.
    mask: bool[B, N].
    normalizer: "num_masked" divides each image's weighted sum by its number of
      masked patches (MAE's mean over masked patches: with uniform weights this
      is exactly MAE's loss); "weight_sum" divides by the sum of the weights.

  Returns:
    float32[K]: each block's loss, averaged over the batch.
  """
  total = jnp.sum(weights * error, axis=-1)  # [B, K]
  if normalizer == "num_masked":
    denom = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)
  elif normalizer == "weight_sum":
    denom = jnp.sum(weights, axis=-1)
  else:
    raise ValueError(f"dds.normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
  return jnp.mean(total / denom, axis=0)


def deep_loss(block_losses: jax.Array, block_weights) -> jax.Array:
  """sum_i lambda_i * loss_i: the outer sum of eq. 3 (pixels) and eq. 5 (features)."""
  return jnp.sum(jnp.asarray(block_weights, jnp.float32) * block_losses)


def total_loss(pixel: jax.Array, distill: jax.Array, weight_norms: jax.Array,
               reg_weight: float) -> jax.Array:
  """Eq. 6: L = L_pixel + L_distill + lambda * sum_i ||h_beta_i(m)||_2.

  Args:
    pixel, distill: scalars from `deep_loss` (0 for a disabled branch).
    weight_norms: float32[B, K'] from `dynamic_weights.weight_l2_norm`, one
      column per learnable beta (K' = K, or 2K with one beta per branch);
      averaged over the batch. Empty when the weights are uniform.
    reg_weight: lambda (paper: 0.5).
  """
  reg = jnp.sum(jnp.mean(weight_norms, axis=0)) if weight_norms.size else 0.0
  return pixel + distill + reg_weight * reg
