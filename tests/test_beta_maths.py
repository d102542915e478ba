"""launch/beta_maths.py: the figures README "Beta over training" quotes, against computations
no one here wrote (scipy's distance transform) and eq. 2 written out in float64 NumPy."""

import importlib.util

import numpy as np
import pytest
from repo_paths import repo_path
from scipy import ndimage


@pytest.fixture(scope="module")
def beta_maths():
  spec = importlib.util.spec_from_file_location("beta_maths", repo_path("launch/beta_maths.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quickstart_masks(beta_maths):
  """(grid, 256 quickstart masks, their distance maps from the package)."""
  grid, masking = beta_maths.masking_configs()["quickstart 8x8"]
  return (grid,) + beta_maths.masks_and_distances(grid, masking, 256)


def _edt(mask, grid):
  """scipy's distance of every masked patch to the nearest visible one. float64[B, N]."""
  return np.stack([ndimage.distance_transform_edt(m.reshape(grid)).reshape(-1) for m in mask])


def test_quickstart_distances_are_short_next_to_vitb(beta_maths, quickstart_masks):
  """README: mean 1.65 and 2.5% at >= 4 on the quickstart's 8 x 8 grid (2,048 masks),
  11% at >= 4 on ViT-B's 14 x 14 with BootMAE's masks; here 256 masks each."""
  grid, masking = beta_maths.masking_configs()["ViT-B 14x14, BootMAE"]
  runs = {"quickstart 8x8": quickstart_masks,
          "ViT-B 14x14, BootMAE": (grid,) + beta_maths.masks_and_distances(grid, masking, 256)}
  stats = {}
  for name, (grid, mask, distance) in runs.items():
    reference = _edt(mask, grid)
    np.testing.assert_allclose(distance, reference, rtol=1e-6)
    s = stats[name] = beta_maths.distance_stats(mask, distance)
    assert s["mean"] == pytest.approx(reference[mask].mean(), rel=1e-5)
    assert s["share_ge4"] == pytest.approx(np.mean(reference[mask] >= 4))
    assert sum(s["bins"].values()) == pytest.approx(1.0)
  quick, vitb = stats["quickstart 8x8"], stats["ViT-B 14x14, BootMAE"]
  assert 1.55 < quick["mean"] < 1.75 and quick["share_ge4"] < 0.04
  assert vitb["mean"] > 2.0 and vitb["share_ge4"] > 0.08


def test_weights_are_eq2_rescaled_and_near_their_limit_below_minus_3(beta_maths):
  d = np.sqrt(np.asarray(beta_maths.SQUARED_DISTANCES, np.float64))
  betas = np.asarray(beta_maths.BETAS, np.float64)
  h = np.exp(d[None] ** betas[:, None])
  h /= h.sum(-1, keepdims=True)                                      # eq. 2
  table = beta_maths.weight_table()
  np.testing.assert_allclose(table, h / h.max(-1, keepdims=True), rtol=1e-5)
  limit = np.where(d == 1, 1.0, np.exp(-1.0))
  at_minus_3 = table[list(betas).index(-3.0)]
  assert np.all(np.abs(at_minus_3 - limit)[d >= 2] < 0.05)
  assert np.abs(at_minus_3 - limit)[d == np.sqrt(2)] > 0.1         # sqrt(2) still moves


def test_limit_progress_against_numpy(beta_maths, quickstart_masks):
  """Eq. 2's distribution on quickstart masks: README's 0.84 of the way at beta = -3."""
  grid, mask, _ = quickstart_masks
  d = _edt(mask, grid)
  safe = np.where(mask, d, 1.0)

  def eq2(beta):
    h = np.where(mask, np.exp(safe ** beta), 0.0)
    return h / h.sum(-1, keepdims=True)

  limit = np.where(mask & (d == 1), np.e, mask.astype(float))
  limit /= limit.sum(-1, keepdims=True)
  tv = lambda h: 0.5 * np.abs(h - limit).sum(-1)
  betas = (-0.5, -3.0, -4.5)
  expected = [np.mean(1 - tv(eq2(b)) / tv(eq2(0.0))) for b in betas]
  progress = beta_maths.limit_progress(mask, d.astype(np.float32), betas)
  np.testing.assert_allclose(progress, expected, rtol=1e-4)
  assert progress[0] < 0.4 and 0.8 < progress[1] < 0.9 and progress[2] > 0.9
