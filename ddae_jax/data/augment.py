"""Host-side image decoding and the pretraining augmentation (random-resized crop, flip,
and BEiT's colour jitter).

Runs in NumPy and PIL, which release the GIL while decoding and resizing, so a
thread pool scales over the host's cores; no tensorflow is needed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance


class UndecodableImage(ValueError):
  """The bytes are not an image PIL can read."""


def decode(image) -> Image.Image:
  """Encoded bytes (JPEG, PNG, ...) or a uint8 array [H, W(, C)] -> an RGB PIL image."""
  if isinstance(image, np.ndarray):
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
  try:
    img = Image.open(io.BytesIO(bytes(image)))
    img.load()
  except Exception as err:  # PIL raises many types for broken files
    raise UndecodableImage(str(err)) from err
  return img.convert("RGB")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop box: area fraction in `scale`, log-uniform aspect.

  Returns (left, top, right, bottom) in pixels. MAE pretrains with scale (0.2, 1).
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  # Fallback, as torchvision: a centre crop at the clamped aspect ratio.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


# torchvision's ColorJitter on PIL images: these enhancers, in a random order.
_JITTERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
  """torchvision's ColorJitter(strength, strength, strength) (no hue), as BEiT pretrains.

  Brightness, contrast and saturation factors are drawn from
  U[1 - strength, 1 + strength] and applied in a random order, each through
  PIL's enhancer (what torchvision calls for PIL images).
  """
  factors = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3)
  for i in rng.permutation(3):
    img = _JITTERS[i](img).enhance(float(factors[i]))
  return img


def pretrain_view(image, rng: np.random.Generator, size: int, scale=(0.2, 1.0),
                  flip: bool = True, jitter: float = 0.0) -> np.ndarray:
  """Random-resized crop to size x size (bicubic) and a horizontal flip. -> uint8[size, size, 3].

  jitter > 0 first applies `color_jitter` to the whole image (BEiT's order:
  jitter, then crop); 0 draws nothing, so the crops are those of a run without it.
  """
  img = decode(image)
  box = random_resized_crop_box(rng, img.width, img.height, scale)
  if jitter > 0:
    img = color_jitter(img, rng, jitter)
  img = img.resize((size, size), Image.BICUBIC, box=box)
  out = np.asarray(img, dtype=np.uint8)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def center_view(image, size: int, resize: int | None = None) -> np.ndarray:
  """Evaluation view: shorter side to `resize` (default size / 0.875), centre crop. -> uint8."""
  img = decode(image)
  resize = resize or int(round(size / 0.875))
  scale = resize / min(img.width, img.height)
  img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                   Image.BICUBIC)
  left, top = (img.width - size) // 2, (img.height - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
