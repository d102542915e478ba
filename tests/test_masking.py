"""Masks: exact counts, rectangles, determinism."""

import jax
import numpy as np
import pytest

from ddae_jax.objectives import masking


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.75), ((8, 8), 0.5), ((7, 9), 0.9),
                                        ((14, 14), 0.4), ((16, 16), 0.75)])
def test_blockwise_exact_count_and_rectangles(grid, ratio):
  mask, rects = masking.blockwise_mask(jax.random.PRNGKey(1), 64, grid, ratio,
                                       min_patches=min(16, grid[0] * grid[1] // 8),
                                       return_rectangles=True)
  mask, rects = np.asarray(mask), jax.tree.map(np.asarray, rects)
  target = round(ratio * grid[0] * grid[1])
  np.testing.assert_array_equal(mask.sum(-1), target)
  fills = []
  for b in range(mask.shape[0]):
    union = np.zeros(grid, bool)
    for t, left, h, w, ok in zip(rects.top[b], rects.left[b], rects.height[b], rects.width[b],
                                 rects.accepted[b], strict=True):
      if ok:
        assert 1 <= h < grid[0] and 1 <= w < grid[1]
        union[t:t + h, left:left + w] = True
    union = union.reshape(-1)
    # Every masked patch outside the rectangles came from the fill step...
    assert not np.any(union & ~mask[b])
    fills.append(int((mask[b] & ~union).sum()))
  # ...and the fill is a small remainder: the masks are made of rectangles.
  assert np.mean(fills) < 0.1 * target, fills


def test_blockwise_uses_rectangles_not_scatter():
  """Blockwise masks are spatially clustered: far more masked neighbours than random."""
  def neighbours(mask, grid):
    m = np.asarray(mask).reshape(-1, *grid)
    return (m[:, 1:, :] & m[:, :-1, :]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()
  grid = (14, 14)
  block = masking.blockwise_mask(jax.random.PRNGKey(0), 32, grid, 0.4)
  rand = masking.random_mask(jax.random.PRNGKey(0), 32, grid, 0.4)
  assert neighbours(block, grid) > 1.5 * neighbours(rand, grid)


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.75), ((5, 3), 0.5), ((14, 14), 0.9)])
def test_random_exact_count(grid, ratio):
  mask = np.asarray(masking.random_mask(jax.random.PRNGKey(3), 32, grid, ratio))
  np.testing.assert_array_equal(mask.sum(-1), round(ratio * grid[0] * grid[1]))
  assert len({m.tobytes() for m in mask}) == 32  # all different


@pytest.mark.parametrize("kind", masking.MASKINGS)
def test_masks_are_deterministic_from_the_key(kind):
  a = masking.make_mask(jax.random.PRNGKey(7), 8, (14, 14), 0.75, kind)
  b = masking.make_mask(jax.random.PRNGKey(7), 8, (14, 14), 0.75, kind)
  c = masking.make_mask(jax.random.PRNGKey(8), 8, (14, 14), 0.75, kind)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_fill_to_count_only_adds():
  mask = np.zeros((4, 20), bool)
  mask[:, :5] = True
  out = np.asarray(masking.fill_to_count(jax.random.PRNGKey(0), mask, 12))
  np.testing.assert_array_equal(out.sum(-1), 12)
  assert out[:, :5].all()


def test_visible_and_masked_ids_restore_order():
  mask = masking.random_mask(jax.random.PRNGKey(0), 4, (4, 4), 0.75)
  keep, restore = masking.visible_and_masked_ids(mask, 4)
  keep, restore, mask = map(np.asarray, (keep, restore, mask))
  for b in range(4):
    np.testing.assert_array_equal(keep[b], np.flatnonzero(~mask[b]))
    order = np.concatenate([keep[b], np.flatnonzero(mask[b])])
    np.testing.assert_array_equal(order[restore[b]], np.arange(16))
