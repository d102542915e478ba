"""RandAugment on the host with PIL: timm's `rand_augment_transform('rand-m9-mstd0.5-inc1')`.

Two ops drawn with replacement from timm's "increasing" list, each applied
with probability 0.5 at a magnitude drawn per op from N(m, std) clipped to
[0, 10]. Signed ops (rotate, shear, translate, the enhancers) flip sign with
probability 0.5. Geometric ops fill with timm's ImageNet mean colour
(124, 116, 104) and resample bicubically (MAE's interpolation). All
randomness comes from the caller's NumPy generator, so a view is a function
of (seed, record) and resumes exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_MAX = 10.0
FILL = (124, 116, 104)
TRANSLATE_PCT = 0.45


def _signed(rng, value):
  return -value if rng.random() < 0.5 else value


def _affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _rotate(img, m, rng):
  return img.rotate(_signed(rng, m / LEVEL_MAX * 30.0), resample=Image.BICUBIC, fillcolor=FILL)


def _shear_x(img, m, rng):
  return _affine(img, (1, _signed(rng, m / LEVEL_MAX * 0.3), 0, 0, 1, 0))


def _shear_y(img, m, rng):
  return _affine(img, (1, 0, 0, _signed(rng, m / LEVEL_MAX * 0.3), 1, 0))


def _translate_x(img, m, rng):
  return _affine(img, (1, 0, _signed(rng, m / LEVEL_MAX * TRANSLATE_PCT) * img.size[0], 0, 1, 0))


def _translate_y(img, m, rng):
  return _affine(img, (1, 0, 0, 0, 1, _signed(rng, m / LEVEL_MAX * TRANSLATE_PCT) * img.size[1]))


def _enhancer(cls):
  def op(img, m, rng):
    return cls(img).enhance(1.0 + _signed(rng, m / LEVEL_MAX * 0.9))
  return op


def _posterize(img, m, rng):
  bits = 4 - int(m / LEVEL_MAX * 4)
  return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize(img, m, rng):
  return ImageOps.solarize(img, 256 - int(m / LEVEL_MAX * 256))


def _solarize_add(img, m, rng):
  add = int(m / LEVEL_MAX * 110)
  lut = [min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands())
  return img.point(lut)


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhancer(ImageEnhance.Color),
    "ContrastIncreasing": _enhancer(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhancer(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
OP_NAMES = tuple(OPS)


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> Image.Image:
  """Applies `num_ops` random ops (with replacement) to an RGB PIL image."""
  for name in rng.choice(OP_NAMES, num_ops, replace=True):
    if rng.random() > prob:
      continue
    m = magnitude
    if magnitude_std > 0:
      m = rng.normal(magnitude, magnitude_std)
    m = float(np.clip(m, 0.0, LEVEL_MAX))
    img = OPS[name](img, m, rng)
  return img
