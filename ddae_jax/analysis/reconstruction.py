"""What a pretrained DDAE sees and predicts: masks, distance maps, eq. 2 weights, K reconstructions.

The reconstructions come from the pixel decoder d_phi_p fed with each
supervised block's features f^(g_i) of the online encoder (the pair that
was trained together, eq. 3). With per-patch normalised targets (norm_pix)
the decoder predicts standardised patches; they are mapped back with the
target patch's own mean and variance, as MAE's visualisation does, so a
reconstruction is shown in the image's colours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from ddae_jax.methods.ddae import DDAE
from ddae_jax.models.decoder import decode_per_block
from ddae_jax.models.vit import patchify, unpatchify
from ddae_jax.objectives import ddae as objective
from ddae_jax.objectives.dynamic_weights import distance_map, loss_weights
from ddae_jax.objectives.masking import visible_and_masked_ids


def denormalize_patches(pred: jax.Array, images: jax.Array, patch: int,
                        norm_pix: bool, stats: str = "per_patch") -> jax.Array:
  """Predicted patches back in the normalised-image space of `images`.

  Args:
    pred: float[B, K, N, patch * patch * 3], the decoder's output.
    images: float[B, H, W, 3], the normalised input images.
    norm_pix: whether the targets were standardised per patch (then pred is
      multiplied by the target patch's std and shifted by its mean, with the
      statistics of `objectives.ddae.patch_statistics`).
    stats: config.pixel.norm_pix_stats, "per_patch" or "per_channel".

  Returns:
    float32[B, K, N, patch * patch * 3].
  """
  pred = pred.astype(jnp.float32)
  if not norm_pix:
    return pred
  mean, std = objective.patch_statistics(images, patch, stats)
  return pred * std[:, None] + mean[:, None]  # [B, 1, N, D] against [B, K, N, D]


def to_display(images: jax.Array) -> np.ndarray:
  """ImageNet-normalised float[..., 3] -> float32 RGB in [0, 1] for plotting."""
  x = np.asarray(images, np.float32) * np.asarray(IMAGENET_STD, np.float32)
  return np.clip(x + np.asarray(IMAGENET_MEAN, np.float32), 0.0, 1.0)


def block_loss_weights(model: DDAE, params: dict, distance: jax.Array,
                       mask: jax.Array) -> jax.Array:
  """The pixel branch's loss weights float32[B, K, N]: eq. 2 rescaled, or the mask (uniform)."""
  if "beta" not in params:
    return jnp.broadcast_to(mask[:, None, :], (mask.shape[0], len(model.blocks),
                                               mask.shape[1])).astype(jnp.float32)
  betas = params["beta"]
  return loss_weights(distance, mask, betas["pixel"] if "pixel" in betas else betas["shared"])


def reconstruct(model: DDAE, params: dict, images: np.ndarray, mask: np.ndarray) -> dict:
  """Everything the `reconstruct` figure shows, for one batch.

  Args:
    model: the run's DDAE (its config must have the pixel branch on).
    params: the train state's `params` (encoder, pixel_decoder, beta if dynamic).
    images: uint8[B, H, W, 3].
    mask: bool[B, N], True = masked, the run's masking ratio.

  Returns:
    dict of NumPy arrays:
      image: float32[B, H, W, 3] in [0, 1];
      masked: the same with masked patches grey (0.5);
      distance: float32[B, rows, cols], the distance map (patches);
      weights: float32[B, K, rows, cols], the loss weights of every supervised block;
      reconstruction: float32[B, K, H, W, 3] in [0, 1], predicted masked patches
        with the visible ones pasted in (MAE's "reconstruction + visible");
      masked_error: float32[B, K], mean squared error on masked patches in the
        loss's target space (normalised per patch when norm_pix).
  """
  if model.pixel_decoder is None:
    raise ValueError("this run has no pixel decoder (pixel.enabled=False): nothing to "
                     "reconstruct from")
  c = model.config
  p, grid = c.model.patch_size, model.grid
  num_visible = int(model.num_patches - np.sum(mask[0]))

  @jax.jit
  def run(params, images, mask):
    x = normalize_images(images)
    distance = distance_map(mask, grid)
    ids_keep, ids_restore = visible_and_masked_ids(mask, num_visible)
    features = model.encode(params["encoder"], x, ids_keep)["features"]
    pred = decode_per_block(model.pixel_decoder, {"params": params["pixel_decoder"]},
                            features, ids_restore, grid)
    stats = c.pixel.get("norm_pix_stats", "per_patch")
    target = objective.pixel_targets(x, p, c.pixel.norm_pix, stats)
    error = objective.per_patch_error(pred, target)  # [B, K, N]
    masked_error = jnp.sum(error * mask[:, None], -1) / jnp.sum(mask, -1)[:, None]
    patches = denormalize_patches(pred, x, p, c.pixel.norm_pix, stats)
    patches = jnp.where(mask[:, None, :, None], patches, patchify(x, p)[:, None])
    b, k = patches.shape[:2]
    recon = unpatchify(patches.reshape((b * k,) + patches.shape[2:]), p, grid)
    weights = block_loss_weights(model, params, distance, mask)
    return x, distance, weights, recon.reshape((b, k) + recon.shape[1:]), masked_error

  x, distance, weights, recon, masked_error = run(params, images, mask)
  image = to_display(x)
  pixel_mask = np.repeat(np.repeat(np.asarray(mask).reshape((-1,) + grid), p, 1), p, 2)
  masked = np.where(pixel_mask[..., None], np.float32(0.5), image)
  return {"image": image, "masked": masked,
          "distance": np.asarray(distance).reshape((-1,) + grid),
          "weights": np.asarray(weights).reshape(weights.shape[:2] + grid),
          "reconstruction": to_display(recon), "masked_error": np.asarray(masked_error)}
