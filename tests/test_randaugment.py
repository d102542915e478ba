"""evaluation/randaugment.py: each RandAugment op against timm's.

timm is imported with the module, i.e. at collection: it loads triton (through torchvision and
torch._dynamo), which crashes the process when TensorFlow was loaded first, as
test_eval_binaries' runs do when one process runs both files.
"""

import random

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment

from ddae_jax.evaluation import randaugment


class _Fixed:
  """A stand-in generator whose random() returns one value (fixes an op's sign)."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


@pytest.mark.parametrize("negate", [False, True])
def test_randaugment_ops_match_timm(negate, monkeypatch):
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8))
  hparams = {"translate_pct": 0.45, "img_mean": randaugment.FILL,
             "interpolation": Image.BICUBIC}
  # timm negates when random() > 0.5, this code when its generator's random() < 0.5.
  monkeypatch.setattr(random, "random", lambda: 0.9 if negate else 0.1)
  assert set(randaugment.OP_NAMES) == set(auto_augment._RAND_INCREASING_TRANSFORMS)
  for name in randaugment.OP_NAMES:
    for m in (3.0, 9.0):
      ref = auto_augment.AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams)(img)
      got = randaugment.OPS[name](img, m, _Fixed(0.1 if negate else 0.9))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=f"{name} m={m}")
