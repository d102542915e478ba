"""Patch masks for masked image modelling, made on device from the step's RNG.

Every mask has exactly `num_masked(ratio, grid)` masked patches per image, so
the number of visible tokens, and with it every shape in the step, is static.

Two kinds:
  * `random_mask`: MAE's uniform shuffle.
  * `blockwise_mask`: BEiT's `MaskingGenerator` (its semantics exactly): each
    rectangle's area is drawn uniformly in [min_patches, min(max_patches,
    patches still missing)], its aspect ratio log-uniformly in [0.3, 1/0.3],
    and it is accepted only if it adds between 1 and that bound of new
    patches, until `block_ratio` of the grid is masked. Then, as BootMAE does
    (`utils.mask_to_index` with `--mask_num 147` over BEiT's 120 patches),
    uniformly chosen visible patches are masked until `ratio` is reached. The
    same top-up fills the rare image whose rectangle attempts run out.

Conventions: a mask is `bool[batch, num_patches]` in raster order, True means
masked (the paper's m_i = 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

MASKINGS = ("blockwise", "random")


def num_masked(ratio: float, grid: tuple[int, int]) -> int:
  """round(ratio * N), clipped so at least one patch stays visible and one is masked."""
  n = grid[0] * grid[1]
  return int(min(max(round(ratio * n), 1), n - 1))


def random_mask(rng: jax.Array, batch: int, grid: tuple[int, int],
                ratio: float) -> jax.Array:
  """MAE's random masking: a uniform random subset of exact size. -> bool[batch, N]."""
  n = grid[0] * grid[1]
  noise = jax.random.uniform(rng, (batch, n))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < num_masked(ratio, grid)


class Rectangles(NamedTuple):
  """The rectangles one blockwise mask was built from (for tests and figures).

  top, left, height, width: int32[batch, max_attempts]; accepted: bool[...].
  """
  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array
  accepted: jax.Array


def _blockwise_one(rng, grid, target, min_patches, max_patches, min_aspect,
                   max_attempts):
  """Rectangles for one image: BEiT's MaskingGenerator as a while loop.

  Each attempt draws area ~ U(min_patches, bound) with bound = min(max_patches,
  target - count), as BEiT's `_mask(mask, max_mask_patches)`, and is accepted
  when it adds 1..bound new patches, so the count never overshoots `target`.
  """
  gh, gw = grid
  rows = jnp.arange(gh)[:, None]
  cols = jnp.arange(gw)[None, :]
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

  def body(carry):
    mask, count, attempt, rects = carry
    k = jax.random.fold_in(rng, attempt)
    k_area, k_aspect, k_top, k_left = jax.random.split(k, 4)
    bound = jnp.minimum(max_patches, target - count)
    # random.uniform(a, b) with b < a (few patches left) still lies between them.
    area = min_patches + (bound - min_patches) * jax.random.uniform(k_area, ())
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=log_aspect[0],
                                        maxval=log_aspect[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h >= 1) & (w >= 1) & (h < gh) & (w < gw)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(gh - h + 1, 1))
    left = jax.random.randint(k_left, (), 0, jnp.maximum(gw - w + 1, 1))
    rect = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w))
    added = jnp.sum(rect & ~mask)
    accept = fits & (added > 0) & (added <= bound)
    mask = jnp.where(accept, mask | rect, mask)
    count = count + jnp.where(accept, added, 0)
    rects = jax.tree.map(lambda r, v: r.at[attempt].set(v), rects,
                         Rectangles(top, left, h, w, accept))
    return mask, count, attempt + 1, rects

  def cond(carry):
    _, count, attempt, _ = carry
    return (count < target) & (attempt < max_attempts)

  zeros = jnp.zeros((max_attempts,), jnp.int32)
  rects = Rectangles(zeros, zeros, zeros, zeros, jnp.zeros((max_attempts,), bool))
  init = (jnp.zeros(grid, bool), jnp.int32(0), jnp.int32(0), rects)
  mask, _, _, rects = jax.lax.while_loop(cond, body, init)
  return mask.reshape(-1), rects


def fill_to_count(rng: jax.Array, mask: jax.Array, target: int) -> jax.Array:
  """Masks uniformly chosen unmasked patches until each row has `target`. bool[B, N]."""
  missing = target - jnp.sum(mask, axis=-1, keepdims=True)
  # Rank the unmasked patches in random order; masked ones sort last.
  noise = jax.random.uniform(rng, mask.shape) + mask.astype(jnp.float32) * 2.0
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return mask | (ranks < missing)


def blockwise_mask(rng: jax.Array, batch: int, grid: tuple[int, int], ratio: float,
                   *, block_ratio: float | None = None, min_patches: int = 16,
                   max_patches: int = 0, min_aspect: float = 0.3,
                   max_attempts: int = 256, return_rectangles: bool = False):
  """BEiT's blockwise masking, topped up at random to an exact count. -> bool[batch, N].

  Args:
    rng: PRNG key; the same key gives the same masks.
    batch: number of images.
    grid: patch grid (rows, cols), e.g. (14, 14).
    ratio: fraction of patches masked in the end, in (0, 1).
    block_ratio: fraction masked by rectangles (BootMAE: 120 / 196); the rest,
      up to `ratio`, is masked uniformly at random. None: all of it by rectangles.
    min_patches: smallest rectangle area, in patches (BEiT: 16).
    max_patches: largest rectangle area (BootMAE: 60); 0: no bound but the
      patches still missing (BEiT's default, `max_num_patches=None`).
    min_aspect: aspect ratios are drawn log-uniformly in [min_aspect, 1/min_aspect].
    max_attempts: rectangles tried per image before the random top-up.
    return_rectangles: also return the `Rectangles` each mask was built from.
  """
  target = num_masked(ratio, grid)
  block_target = target if block_ratio is None else min(num_masked(block_ratio, grid), target)
  min_patches = min(min_patches, block_target)
  max_patches = block_target if max_patches <= 0 else max_patches
  rect_rng, fill_rng = jax.random.split(rng)
  one = lambda k: _blockwise_one(k, grid, block_target, min_patches, max_patches,
                                 min_aspect, max_attempts)
  rect_mask, rects = jax.vmap(one)(jax.random.split(rect_rng, batch))
  mask = fill_to_count(fill_rng, rect_mask, target)
  return (mask, rects) if return_rectangles else mask


def make_mask(rng: jax.Array, batch: int, grid: tuple[int, int], ratio: float,
              kind: str, **blockwise) -> jax.Array:
  """The mask of `kind` ('blockwise' or 'random'). -> bool[batch, N].

  `blockwise` holds `blockwise_mask`'s keyword arguments (block_ratio,
  min_patches, max_patches); without them it is BEiT's generator alone.
  """
  if kind == "blockwise":
    return blockwise_mask(rng, batch, grid, ratio, **blockwise)
  if kind == "random":
    return random_mask(rng, batch, grid, ratio)
  raise ValueError(f"masking must be one of {MASKINGS}, got {kind!r}")


def mask_from_config(rng: jax.Array, batch: int, grid: tuple[int, int], masking) -> jax.Array:
  """The mask a run's `config.masking` asks for (every field reaches the generator)."""
  if masking.kind != "blockwise":
    return make_mask(rng, batch, grid, masking.ratio, masking.kind)
  # .get: config.json files written before these fields existed.
  block_ratio = masking.get("block_ratio", 0.0) or None
  return make_mask(rng, batch, grid, masking.ratio, "blockwise", block_ratio=block_ratio,
                   min_patches=masking.min_patches, max_patches=masking.get("max_patches", 0))


def visible_and_masked_ids(mask: jax.Array, num_visible: int):
  """Token orders for the encoder and decoder.

  Args:
    mask: bool[B, N], exactly N - num_visible True per row.
    num_visible: static number of visible patches.

  Returns:
    ids_keep: int32[B, num_visible], the visible patches in raster order.
    ids_restore: int32[B, N]; position of each patch in [visible..., masked...],
      so `take_along_axis(concat([visible, masked]), ids_restore)` puts the
      tokens back in raster order.
  """
  ids_shuffle = jnp.argsort(mask, axis=-1, stable=True).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  return ids_shuffle[:, :num_visible], ids_restore
