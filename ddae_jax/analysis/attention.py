"""Attention of a ViT encoder: class-token maps (Fig. 3/7), mean attention distance (Fig. 4).

The encoder is run with `capture_attention=True`, which computes the softmax
explicitly and sows it per block; everything here reads those probabilities
`[batch, heads, tokens, tokens]` (token 0 is the class token, then the N
patches in raster order, rows = queries, columns = keys).

Mean attention distance (ViT paper, Dosovitskiy et al. 2020, Fig. 7): for each
query patch, the attention-weighted mean of the pixel distance between its
centre and every key patch's centre, then averaged over query patches and
images. The class token has no position in the image, so it is left out as a
query and as a key, as ViT and the usual re-implementations do; the remaining
patch-key weights are renormalised to sum to 1 per query, so the result is a
true weighted mean distance and does not shrink when a head parks mass on
the class token (that mass is reported separately as `class_token_mass`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax import config_lib
from ddae_jax.methods.base import make_encoder
from ddae_jax.models.vit import ViTEncoder


def patch_pixel_distances(grid: tuple[int, int], patch_size: int) -> np.ndarray:
  """Euclidean distance between patch centres, in pixels. -> float32[N, N], raster order."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  centres = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.float64)
  diff = centres[:, None, :] - centres[None, :, :]
  return (np.sqrt(np.sum(diff ** 2, axis=-1)) * patch_size).astype(np.float32)


def mean_attention_distance(attention: jax.Array, grid: tuple[int, int],
                            patch_size: int) -> dict:
  """Mean attention distance of every head of one block (module docstring).

  Args:
    attention: float[B, heads, 1 + N, 1 + N] softmax probabilities, class token first.
    grid: (rows, cols) of the patch grid, rows * cols = N.
    patch_size: pixels per patch side (distances are in pixels).

  Returns:
    {"distance": float32[heads] in pixels, "class_token_mass": float32[heads],
    the mean attention patch queries give the class token}.
  """
  n = grid[0] * grid[1]
  if attention.shape[-1] != n + 1:
    raise ValueError(f"attention over {attention.shape[-1]} tokens, expected 1 + {n} "
                     f"for a {grid[0]}x{grid[1]} grid with a class token")
  patches = attention[:, :, 1:, 1:].astype(jnp.float32)  # patch queries x patch keys
  mass = jnp.sum(patches, axis=-1)  # [B, H, N]
  dist = jnp.asarray(patch_pixel_distances(grid, patch_size))
  # A query whose whole mass sits on the class token (underflow) counts as 0, not NaN.
  per_query = jnp.einsum("bhqk,qk->bhq", patches, dist) / jnp.maximum(mass, 1e-30)
  return {"distance": jnp.mean(per_query, axis=(0, 2)),
          "class_token_mass": jnp.mean(attention[:, :, 1:, 0].astype(jnp.float32),
                                       axis=(0, 2))}


def class_token_map(attention: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Class-token-to-patch attention averaged over heads (Fig. 3/7).

  Args:
    attention: float[B, heads, 1 + N, 1 + N], class token first.

  Returns:
    float32[B, rows, cols]; sums to 1 minus the class token's attention to itself.
  """
  cls_row = jnp.mean(attention[:, :, 0, 1:].astype(jnp.float32), axis=1)  # [B, N]
  return cls_row.reshape((-1,) + tuple(grid))


def upsample_map(patch_map: np.ndarray, patch_size: int) -> np.ndarray:
  """Repeats each patch's value over its pixels: [..., rows, cols] -> [..., rows*p, cols*p].

  Nearest-patch upsampling keeps the overlay honest: a pixel shows exactly the
  attention of the patch it belongs to.
  """
  return np.repeat(np.repeat(np.asarray(patch_map), patch_size, axis=-2), patch_size, axis=-1)


def analysis_encoder(config, encoder_params: dict) -> ViTEncoder:
  """The config's encoder in float32 with attention capture (matches the checkpoint's params)."""
  # Supervised blocks only add unused feature norms to the output: ask for
  # the last block alone; the extra feature_norm_* parameters are ignored.
  pos_embed = "learned" if "pos_embed" in encoder_params else "sincos"
  if config.model.get("pos_embed") == "none":  # BEiT's student: relative positions only
    pos_embed = "none"
  encoder = make_encoder(config, config_lib.resolve(config), pos_embed=pos_embed)
  return encoder.clone(feature_blocks=(encoder.depth,), dtype=jnp.float32, remat=False,
                       attention_impl=None, capture_attention=True)


def block_attention(encoder: ViTEncoder, encoder_params: dict,
                    images: jax.Array) -> jax.Array:
  """Every block's attention on all patches. images float32[B, H, W, 3] (normalised).

  Returns:
    float32[depth, B, heads, 1 + N, 1 + N].
  """
  _, state = encoder.apply({"params": encoder_params}, images, mutable=["intermediates"])
  inter = state["intermediates"]
  # sow appends to a tuple, one entry per call: this is the only call.
  return jnp.stack([inter[f"block_{i}"]["attn"]["attention"][0]
                    for i in range(encoder.depth)])


# Modules are hashable dataclasses, so checkpoints of one architecture share one compile.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_summary(encoder: ViTEncoder, map_block: int | None, params: dict, images: jax.Array):
  """Per-block distance stats (leading axis = block) and one block's class-token maps."""
  grid = (images.shape[1] // encoder.patch_size, images.shape[2] // encoder.patch_size)
  attn = block_attention(encoder, params, images)
  stats = jax.vmap(lambda a: mean_attention_distance(a, grid, encoder.patch_size))(attn)
  return stats, (class_token_map(attn[map_block - 1], grid) if map_block else None)


def attention_summary(encoder: ViTEncoder, encoder_params: dict, images: jax.Array,
                      map_block: int | None = None, batch: int = 8) -> dict:
  """Mean attention distance of every head and block, and class-token maps of one block.

  Runs `batch` images at a time, so only [depth, batch, heads, T, T] of
  attention (ViT-B, 224 px: 180 MB for 8 images) is ever held.

  Args:
    images: float32[B, H, W, 3], normalised.
    map_block: 1-based block whose class-token maps to return (None: none).

  Returns:
    {"distance": float32[depth, heads] pixels, "class_token_mass": float32[depth, heads],
    "maps": float32[B, rows, cols] or None}.
  """
  if map_block is not None and not 1 <= map_block <= encoder.depth:
    raise ValueError(f"block {map_block} does not exist: the encoder has blocks 1..{encoder.depth}")
  distances, masses, maps = [], [], []
  for start in range(0, images.shape[0], batch):
    x = images[start:start + batch]
    stats, cls = _batch_summary(encoder, map_block, encoder_params, x)
    # Weight each chunk by its images, so a short last chunk counts as it should.
    distances.append(np.asarray(stats["distance"]) * len(x))
    masses.append(np.asarray(stats["class_token_mass"]) * len(x))
    if cls is not None:
      maps.append(np.asarray(cls))
  total = images.shape[0]
  return {"distance": sum(distances) / total, "class_token_mass": sum(masses) / total,
          "maps": np.concatenate(maps) if maps else None}
