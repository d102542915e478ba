"""The DDAE objective: eq. 3 (pixels), eq. 5 (self-distillation), eq. 6 (total).

All per-patch errors here are l2 distances M(a, b) = ||a - b||^2 averaged over
the patch's channels (MAE's convention), laid out [batch, K, patches] with K
the supervised blocks g_1 < ... < g_K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddae_jax.models.vit import patchify

NORMALIZERS = ("weight_sum", "num_masked")
TARGET_NORMS = ("layernorm", "features", "none")


def patch_statistics(images: jax.Array, patch: int, stats: str = "per_patch"):
  """Each patch's (mean, std) as norm_pix uses them, both float32[B, N, patch * patch * C].

  stats="per_patch" (MAE's norm_pix_loss): over all p * p * C values of the
    patch, unbiased variance, eps 1e-6 inside the square root;
  stats="per_channel" (BootMAE run_pretraining.py): over each colour channel of
    the patch on its own, biased variance, eps 1e-5 inside the square root.
  """
  target = patchify(images.astype(jnp.float32), patch)
  if stats == "per_patch":
    groups, axis, ddof, eps = target, -1, 1, 1e-6
  elif stats == "per_channel":
    # patchify lays a patch out as (row, col, channel): split the channels off.
    groups = target.reshape(*target.shape[:-1], -1, images.shape[-1])
    axis, ddof, eps = -2, 0, 1e-5
  else:
    raise ValueError(f"pixel.norm_pix_stats must be 'per_channel' or 'per_patch', got {stats!r}")
  mean = jnp.mean(groups, axis=axis, keepdims=True)
  std = jnp.sqrt(jnp.var(groups, axis=axis, keepdims=True, ddof=ddof) + eps)
  spread = lambda x: jnp.broadcast_to(x, groups.shape).reshape(target.shape)
  return spread(mean), spread(std)


def pixel_targets(images: jax.Array, patch: int, norm_pix: bool,
                  stats: str = "per_patch") -> jax.Array:
  """The regression targets x_M: [B, H, W, C] -> [B, N, patch * patch * C].

  With norm_pix, each patch is standardised by `patch_statistics(..., stats)`.
  """
  target = patchify(images.astype(jnp.float32), patch)
  if not norm_pix:
    return target
  mean, std = patch_statistics(images, patch, stats)
  return (target - mean) / std


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without affine parameters (float32)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


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
    target = layer_norm(target)
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
    normalizer: "weight_sum" divides each image's weighted sum by the sum of its
      weights (a weighted mean: beta's gradient is the covariance of the
      errors with d(weight)/d(beta), so it follows the data); "num_masked" by
      its number of masked patches (MAE's mean over masked patches). With
      uniform weights both are exactly MAE's loss.

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
               reg_weight: float, distill_weight: jax.Array | float = 1.0) -> jax.Array:
  """Eq. 6: L = L_pixel + w_d L_distill + lambda * sum_i ||h_beta_i(m)||_2.

  Args:
    pixel, distill: scalars from `deep_loss` (0 for a disabled branch).
    distill_weight: w_d, BootMAE's ramp of the distillation weight (1 in eq. 6
      as printed; `methods.schedules.distill_weight` gives the schedule).
    weight_norms: float32[B, K'] from `dynamic_weights.weight_l2_norm`, one
      column per learnable beta (K' = K, or 2K with one beta per branch);
      averaged over the batch. Empty when the weights are uniform.
    reg_weight: lambda (paper: 0.5).
  """
  reg = jnp.sum(jnp.mean(weight_norms, axis=0)) if weight_norms.size else 0.0
  return pixel + distill_weight * distill + reg_weight * reg
