"""Mixup, cutmix, label smoothing and random erasing on the device (timm semantics).

timm's `Mixup` in "batch" mode: one lambda per batch; with probability
`switch_prob` cutmix (lambda ~ Beta(cutmix, cutmix)) else mixup
(lambda ~ Beta(mixup, mixup)); each image is mixed with the batch reversed;
cutmix's lambda is corrected to the pasted box's true area; targets are
lambda * smooth(y) + (1 - lambda) * smooth(y reversed), smooth(y) giving
1 - s + s / C to the class and s / C to the others, so each row sums to one.
Random erasing (timm, mode "pixel") fills a host-drawn box of the normalised
image with standard-normal noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _box_mask(rng, lam, height: int, width: int):
  """timm's rand_bbox: a box of side ratio sqrt(1 - lam) around a uniform centre, clipped.

  Returns (bool[H, W] mask of the box, the box's area fraction).
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return mask, (y1 - y0) * (x1 - x0) / (height * width)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
              mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
              switch_prob: float = 0.5, smoothing: float = 0.1):
  """Mixes a batch as timm's Mixup(mode="batch", correct_lam=True).

  Args:
    images: float[B, H, W, C] (normalised).
    labels: int[B].

  Returns:
    (mixed float[B, H, W, C], targets float32[B, C] with rows summing to one, lambda []).
  """
  k_apply, k_switch, k_lam_m, k_lam_c, k_box = jax.random.split(rng, 5)
  b, h, w, _ = images.shape
  lam_mix = jax.random.beta(k_lam_m, mixup, mixup) if mixup > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_lam_c, cutmix, cutmix) if cutmix > 0 else jnp.float32(1.0)
  if mixup > 0 and cutmix > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix > 0)
  apply = jax.random.uniform(k_apply) < prob if (mixup > 0 or cutmix > 0) else False
  box, area = _box_mask(k_box, lam_cut, h, w)
  lam = jnp.where(use_cutmix, 1.0 - area, lam_mix)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  flipped = images[::-1]
  cut_images = jnp.where(box[None, :, :, None], flipped, images)
  mixed_images = images * lam + flipped * (1.0 - lam)
  out = jnp.where(apply & use_cutmix, cut_images,
                  jnp.where(apply, mixed_images.astype(images.dtype), images))
  # timm's one-hot: 1 - s + s / C on the label, s / C elsewhere.
  y = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return out, lam * y + (1.0 - lam) * y[::-1], lam


# ------------------------------------------------------------------ random erasing
# timm RandomErasing's defaults: 2%..1/3 of the image, aspect ratio 0.3..1/0.3 (log-uniform).
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def erase_box(rng: np.random.Generator, height: int, width: int, prob: float,
              area=ERASE_AREA, log_aspect=ERASE_LOG_ASPECT) -> np.ndarray:
  """timm RandomErasing's box, drawn on the host: int32[4] (top, left, h, w); h = 0: none."""
  if rng.random() >= prob:
    return np.zeros(4, np.int32)
  for _ in range(10):
    target = rng.uniform(*area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if w < width and h < height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return np.asarray([top, left, h, w], np.int32)
  return np.zeros(4, np.int32)


def apply_erasing(rng: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Fills each image's box with N(0, 1) noise (timm mode "pixel": per pixel and channel).

  Args:
    images: float[B, H, W, C], normalised.
    boxes: int32[B, 4] (top, left, height, width) from `erase_box`.
  """
  _, h, w, _ = images.shape
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  top, left, bh, bw = (boxes[:, i, None, None] for i in range(4))
  inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  noise = jax.random.normal(rng, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
