"""evaluation/mixup.py: mixup and cutmix targets against timm, random erasing's box."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddae_jax.evaluation import mixup


def _timm_mixup_target(target, num_classes, lam, smoothing):
  """timm.data.mixup.mixup_target, transcribed to NumPy."""
  off = smoothing / num_classes
  y1 = np.full((len(target), num_classes), off)
  y1[np.arange(len(target)), target] = 1.0 - smoothing + off
  return y1 * lam + y1[::-1] * (1.0 - lam)


def test_mixup_and_cutmix_targets_sum_to_one_and_match_timm():
  images = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 3))
  labels = jnp.asarray([0, 3, 1, 4, 2, 3])
  seen_cutmix = seen_mixup = False
  mix = jax.jit(lambda rng: mixup.mix_batch(rng, images, labels, 5, 0.8, 1.0, 1.0, 0.5, 0.1))
  for seed in range(12):
    out, targets, lam = mix(jax.random.PRNGKey(seed))
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)
    ref = _timm_mixup_target(np.asarray(labels), 5, float(lam), 0.1)
    np.testing.assert_allclose(targets, ref, atol=1e-6)
    pasted = np.isclose(out, images[::-1]) & ~np.isclose(out, images)
    if np.allclose(out, images * lam + images[::-1] * (1 - lam), atol=1e-5) and lam < 1:
      seen_mixup = True
    elif pasted.any():
      # cutmix: lambda is corrected to the share of pixels kept from the image itself.
      seen_cutmix = True
      assert pasted[0, ..., 0].mean() == pytest.approx(1 - float(lam), abs=1e-6)
  assert seen_mixup and seen_cutmix


def test_erasing_fills_only_the_box():
  rng = np.random.default_rng(3)
  boxes = np.stack([mixup.erase_box(rng, 16, 16, 1.0), np.zeros(4, np.int32)])
  images = jnp.full((2, 16, 16, 3), 7.0)
  out = np.asarray(mixup.apply_erasing(jax.random.PRNGKey(0), images, jnp.asarray(boxes)))
  top, left, h, w = boxes[0]
  assert h > 0 and (out[0, top:top + h, left:left + w] != 7.0).all()
  assert (out[0] != 7.0).sum() == h * w * 3 and (out[1] == 7.0).all()
