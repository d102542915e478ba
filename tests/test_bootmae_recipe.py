"""DDAE's defaults where the paper defers to BootMAE, against NumPy transcriptions
of LightDXY/BootMAE (masking_generator.py, utils.py, run_pretraining.py).

The transcriptions below are written from the reference code's behaviour, in
NumPy, so a change in our JAX code cannot change the reference.
"""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load
from scipy import ndimage

from ddae_jax import config_lib
from ddae_jax.methods import schedules
from ddae_jax.methods.ddae import DDAE
from ddae_jax.models.decoder import decode_per_block
from ddae_jax.objectives import ddae as objective
from ddae_jax.objectives import masking
from ddae_jax.objectives.dynamic_weights import distance_map


# ---------------------------------------------------------------- references
def beit_masking_generator(rng, grid, num_masking, min_num=4, max_num=None, min_aspect=0.3):
  """BEiT's MaskingGenerator.__call__ (BootMAE masking_generator.py) in NumPy."""
  height, width = grid
  max_num = num_masking if max_num is None else max_num
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  mask = np.zeros(grid, int)
  count = 0
  while count < num_masking:
    bound = min(num_masking - count, max_num)
    delta = 0
    while True:  # _mask: draw until a rectangle adds something
      area = rng.uniform(min_num, bound)
      aspect = math.exp(rng.uniform(*log_aspect))
      h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        covered = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - covered <= bound:
          delta = h * w - covered
          mask[top:top + h, left:left + w] = 1
      if delta > 0:
        break
    count += delta
  return mask


def bootmae_mask(rng, nprng, grid=(14, 14), num_blockwise=120, mask_num=147):
  """BootMAE's default masks: BEiT's 120 (rectangles of 16..60), then
  utils.mask_to_index's ordering keeps the first N - 147 as visible, i.e. masks
  27 uniformly random visible patches more. (Its random roll of 0-3 positions
  per batch is left out: it swaps at most 3 patches between the two sets.)"""
  block = beit_masking_generator(rng, grid, num_blockwise, 16, 60).reshape(-1).astype(bool)
  key = (1 - block) + nprng.random(block.size)  # masked in [0, 1), visible in [1, 2)
  order = np.argsort(1 - key)  # visible first (largest key first), then masked
  mask = np.ones(block.size, bool)
  mask[order[:block.size - mask_num]] = False
  return mask


def distance_statistics(masks, grid):
  """Mean distance of a masked patch to the nearest visible one, share at 1, share >= 3."""
  d = np.concatenate([ndimage.distance_transform_edt(m.reshape(grid))[m.reshape(grid)]
                      for m in masks])
  return d.mean(), np.mean(np.isclose(d, 1.0)), np.mean(d >= 3.0 - 1e-6)


def bootmae_momentum(epoch, start=0.999):
  """BootMAE utils.adjust_ema_momentum with --model_ema_dynamic."""
  if epoch < 100:
    return start + epoch / 100 * (0.9999 - start)
  return 0.9999 + min(300, epoch - 100) / 300 * (0.99999 - 0.9999)


def bootmae_feature_weight(epoch, epochs, feature_weight=1.0):
  """run_pretraining.train_one_epoch: linear increase over the first 25% of epochs."""
  w = feature_weight * (1 + epoch) / epochs
  return min(w * 4, feature_weight)


def bootmae_norm_pix(images_nchw, p):
  """run_pretraining.py's per-patch, per-channel pixel normalisation (NCHW in and out)."""
  b, c, h, w = images_nchw.shape
  g = h // p
  patch = images_nchw.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
  mean = patch.mean(axis=(2, 3), keepdims=True)
  std = np.sqrt(patch.var(axis=(2, 3), keepdims=True) + 1e-5)
  spread = lambda x: np.broadcast_to(x, patch.shape).reshape(b, g, g, c, p, p).transpose(
      0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
  return (images_nchw - spread(mean)) / spread(std)


def layer_norm(x, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


# ---------------------------------------------------------------------- tests
def test_default_masks_have_bootmaes_distance_statistics():
  """The distance map is what eq. 2 weighs: the default masks must match BootMAE's."""
  config = config_lib.base_config()
  grid = config_lib.grid_size(config)
  n = 1200
  ours = np.asarray(jax.jit(lambda k: masking.mask_from_config(k, n, grid, config.masking))(
      jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(ours.sum(-1), 147)
  rng, nprng = random.Random(0), np.random.default_rng(0)
  ref = np.stack([bootmae_mask(rng, nprng, grid) for _ in range(n)])
  np.testing.assert_array_equal(ref.sum(-1), 147)
  mean, at_1, far = distance_statistics(ours, grid)
  ref_mean, ref_at_1, ref_far = distance_statistics(ref, grid)
  assert mean == pytest.approx(ref_mean, rel=0.04), (mean, ref_mean)
  assert at_1 == pytest.approx(ref_at_1, rel=0.04), (at_1, ref_at_1)
  assert far == pytest.approx(ref_far, rel=0.08), (far, ref_far)
  # The blockwise part alone: BEiT's generator with the same bounds.
  block = np.asarray(masking.blockwise_mask(jax.random.PRNGKey(1), 400, grid, 120 / 196,
                                            min_patches=16, max_patches=60))
  ref_block = np.stack([beit_masking_generator(rng, grid, 120, 16, 60).reshape(-1)
                        for _ in range(400)]).astype(bool)
  for a, b in zip(distance_statistics(block, grid), distance_statistics(ref_block, grid),
                  strict=True):
    assert a == pytest.approx(b, rel=0.06)


def test_beitv2_masks_have_beits_statistics():
  """BEiT-v2 keeps BEiT's generator alone: 75 patches, rectangles up to all still missing."""
  from ddae_jax import ablations
  config = config_lib.base_config()
  ablations.beitv2_defaults(config)
  grid = config_lib.grid_size(config)
  ours = np.asarray(masking.mask_from_config(jax.random.PRNGKey(2), 600, grid, config.masking))
  np.testing.assert_array_equal(ours.sum(-1), 75)
  rng = random.Random(1)
  ref = np.stack([beit_masking_generator(rng, grid, 75, 16).reshape(-1)
                  for _ in range(600)]).astype(bool)
  for a, b in zip(distance_statistics(ours, grid), distance_statistics(ref, grid), strict=True):
    assert a == pytest.approx(b, rel=0.06)


def test_masking_fields_reach_the_generator():
  """min/max patches and the blockwise share change the masks the step draws."""
  config = config_lib.base_config()
  grid = config_lib.grid_size(config)
  key = jax.random.PRNGKey(3)
  base = np.asarray(masking.mask_from_config(key, 64, grid, config.masking))
  for field, value in (("min_patches", 30), ("max_patches", 20), ("block_ratio", 0.3)):
    other = config_lib.base_config()
    other.masking[field] = value
    changed = np.asarray(masking.mask_from_config(key, 64, grid, other.masking))
    np.testing.assert_array_equal(changed.sum(-1), 147)
    assert not np.array_equal(base, changed), field
  # A smaller blockwise share means more isolated random patches: shorter distances.
  less = config_lib.base_config()
  less.masking.block_ratio = 0.3
  m_less = np.asarray(masking.mask_from_config(key, 256, grid, less.masking))
  assert distance_statistics(m_less, grid)[0] < distance_statistics(
      np.asarray(masking.mask_from_config(key, 256, grid, config.masking)), grid)[0]


@pytest.mark.parametrize("epochs", [100, 800])
def test_momentum_schedule_is_bootmaes(epochs):
  config = config_lib.base_config()
  config.epochs = float(epochs)
  per_epoch = config.num_train_images / config.batch_size
  steps = config_lib.steps(config)
  for epoch in (0, 1, 37, 99, 100, 101, 250, 399, 400, 401, 799):
    if epoch >= epochs:
      continue
    for into in (0.01, 0.5, 0.99):  # constant within an epoch
      step = int((epoch + into) * per_epoch)
      assert float(schedules.ema_momentum(config, jnp.asarray(step), steps)) == pytest.approx(
          bootmae_momentum(epoch), abs=2e-7), (epoch, into)
  last = int((epochs - 0.5) * per_epoch)
  assert float(schedules.ema_momentum(config, jnp.asarray(last), steps)) == pytest.approx(
      bootmae_momentum(epochs - 1), abs=2e-7)


@pytest.mark.parametrize("epochs", [100, 800, 10])
def test_distillation_weight_ramp_is_bootmaes(epochs):
  config = config_lib.base_config()
  config.epochs = float(epochs)
  per_epoch = config.num_train_images / config.batch_size
  steps = config_lib.steps(config)
  for epoch in range(0, epochs, max(1, epochs // 40)):
    step = int((epoch + 0.5) * per_epoch)
    assert float(schedules.distill_weight(config, jnp.asarray(step), steps)) == pytest.approx(
        bootmae_feature_weight(epoch, epochs), rel=1e-6), epoch
  config.distill.weight_ramp = 0.0
  assert float(schedules.distill_weight(config, jnp.asarray(0), config_lib.steps(config))) == 1.0


def test_per_channel_norm_pix_is_bootmaes():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 3, 16, 16)).astype(np.float32) * 2 + 0.3
  ref = bootmae_norm_pix(images.astype(np.float64), 4)  # NCHW
  ours = objective.pixel_targets(jnp.asarray(images.transpose(0, 2, 3, 1)), 4, True,
                                 "per_channel")  # [B, N, 4 * 4 * 3], (row, col, channel)
  ref_patches = ref.transpose(0, 2, 3, 1).reshape(2, 4, 4, 4, 4, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  np.testing.assert_allclose(np.asarray(ours), ref_patches, rtol=1e-4, atol=1e-5)
  # MAE's statistics are another thing: the two must differ on the same images.
  mae = objective.pixel_targets(jnp.asarray(images.transpose(0, 2, 3, 1)), 4, True, "per_patch")
  assert np.abs(np.asarray(mae) - ref_patches).max() > 0.05


def test_distillation_loss_normalises_prediction_and_target():
  """BootMAE's Ploss: mean over masked patches of (LN(target) - LN(prediction))^2,
  on the last block (distillation only, uniform weights)."""
  config = config_lib.tiny_config()
  config.pixel.enabled = False
  config.dds.deep_supervision, config.dds.dynamic = False, False
  model = DDAE(config, config_lib.resolve(config))
  params = model.init(jax.random.PRNGKey(0))
  ema = jax.tree.map(lambda x: x * 0.9, params["encoder"])
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
  mask = masking.mask_from_config(jax.random.PRNGKey(1), 3, model.grid, config.masking)
  distance = distance_map(mask, model.grid)
  ema_out = model.encode(ema, images)
  loss, metrics = model.loss(params, images, mask, distance, ema_out, distill_weight=0.25)

  from ddae_jax.objectives.masking import visible_and_masked_ids
  ids_keep, ids_restore = visible_and_masked_ids(mask, model.num_visible())
  features = model.encode(params["encoder"], images, ids_keep)["features"]
  pred = np.asarray(decode_per_block(model.distill_decoder, {"params": params["distill_decoder"]},
                                     features, ids_restore, model.grid), np.float64)[:, -1]
  target = np.asarray(ema_out["hidden"], np.float64)[:, -1, 1:]
  m = np.asarray(mask)
  sq = (layer_norm(target) - layer_norm(pred)) ** 2  # [B, N, D]
  ploss = np.mean(m[..., None] * sq) / np.mean(m)
  assert float(metrics["distill_loss"]) == pytest.approx(ploss, rel=2e-4)
  assert float(loss) == pytest.approx(0.25 * ploss, rel=2e-4)  # eq. 6 with w_d
  # Without pred_norm, the raw prediction is compared (another number).
  config.distill.pred_norm = False
  _, raw = DDAE(config, config_lib.resolve(config)).loss(params, images, mask, distance, ema_out)
  assert abs(float(raw["distill_loss"]) - ploss) > 1e-3 * ploss


def test_paper_configs_default_to_bootmaes_recipe_and_mae_rows_to_maes():
  for name in ("vits.py", "vitb.py", "vitl.py"):
    c = load(f"configs/{name}")
    assert (c.masking.kind, c.masking.block_ratio, c.masking.min_patches,
            c.masking.max_patches) == ("blockwise", 120 / 196, 16, 60), name
    assert config_lib.grid_size(c) == (14, 14)
    assert masking.num_masked(c.masking.ratio, (14, 14)) == 147
    assert c.dds.normalizer == "weight_sum" and c.pixel.norm_pix_stats == "per_channel"
    assert c.distill.pred_norm and c.distill.target_norm == "layernorm"
    assert c.distill.weight_ramp == 0.25 and c.ema.schedule == "bootmae"
    assert c.optim.min_lr == 1e-4
  for name, arg in (("mae_vitb.py", ""), ("mae_vits.py", "")):
    c = load(f"configs/{name}", arg)
    assert c.masking.kind == "random" and c.pixel.norm_pix_stats == "per_patch"
    assert not c.distill.enabled and c.optim.min_lr == 0.0
