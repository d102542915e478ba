"""ImageNet standardisation of uint8 crops, done on the devices inside the jitted steps.

The host ships uint8 [B, H, W, 3] (4x fewer bytes than float32); every step
(pretraining, fine-tuning, probing, k-NN, analysis) standardises the same way.
"""

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] in 0..255 (or float in [0, 1]) -> ImageNet-standardised float32."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
