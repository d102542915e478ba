"""The ViT encoder: timm's VisionTransformer layout, run on visible tokens only.

Parameter names follow timm (`patch_embed`, `cls_token`, `block_{i}/norm1`,
`attn/qkv`, `attn/proj`, `norm2`, `mlp/fc1`, `mlp/fc2`, `norm`) so weights map
one to one. Position embeddings are MAE's fixed 2-D sin-cos table: a constant
in pretraining (`pos_embed="sincos"`), or a parameter `pos_embed` initialised
from that table (`pos_embed="learned"`), as MAE's fine-tuning and timm have
it. Initialisation follows MAE (xavier-uniform linears, normal(0.02)
class token, zero biases).

BEiT's student (`pos_embed="none"`, `rel_pos_bias=True`, `layer_scale=0.1`)
has no absolute positions, one relative position bias table shared by all
blocks (`rel_pos_bias/relative_position_bias_table`, zeros at init) and
per-channel residual scales `gamma_1`, `gamma_2` in every block, with the
names and numerics of timm's `Beit`. DDAE and MAE leave all three off.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax.models.attention import attend_qkv

# (width, depth, heads) of the standard sizes; "tiny" is for tests and the CPU.
VIT_SIZES = {
    "tiny": (64, 4, 4),
    "tiny6": (32, 6, 2),  # tests of K = 6 supervised blocks (Table 6)
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
FEATURE_NORMS = ("per_block", "final")
POS_EMBEDS = ("sincos", "learned", "none")

dense_init = nn.initializers.xavier_uniform()


def sincos_pos_embed(width: int, grid: tuple[int, int]) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position table, class token row included (zeros).

  Half of the channels encode one grid axis, half the other, each as
  [sin(pos * omega), cos(pos * omega)] with omega = 10000^(-j / (width/4)).
  MAE builds the first half from the column index and the second from the row
  index; this keeps that order so MAE checkpoints behave the same here.

  Returns:
    float32[1 + rows * cols, width].
  """
  if width % 4:
    raise ValueError(f"sin-cos position embeddings need width % 4 == 0, got {width}")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

  def one_axis(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64),
                           np.arange(grid[1], dtype=np.float64), indexing="ij")
  table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
  return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, patch * patch * C], patches in raster order, pixels (p, q, c).

  The same flattening as MAE's `patchify`, so pixel targets agree with MAE's.
  """
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: [B, N, patch * patch * C] -> [B, H, W, C]."""
  b, _, d = patches.shape
  c = d // (patch * patch)
  x = patches.reshape(b, grid[0], grid[1], patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid[0] * patch, grid[1] * patch, c)


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused qkv layout ([q | k | v], heads inside)."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None  # attend()'s impl: "xla", None (jax's), "cudnn", "pallas*"
  # Computes the softmax explicitly and sows it as intermediates/attention
  # [B, heads, T, T] (float32) for analysis; the fused kernel never forms it.
  capture_attention: bool = False

  @nn.compact
  def __call__(self, x, bias=None):
    """x [B, T, D]; bias: None or logits added before the softmax, [B or 1, heads, T, T]."""
    b, t, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
    if self.capture_attention:
      q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads), 2, 0)
      scale = (d // self.num_heads) ** -0.5
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
      if bias is not None:
        logits = logits + bias.astype(q.dtype).astype(jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1)
      self.sow("intermediates", "attention", probs)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, t, d)
    else:
      out = attend_qkv(qkv, self.num_heads, bias, self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # torch's nn.GELU is the exact (erf) form
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  drop_path is stochastic depth (per-sample residual drop), used by fine-tuning.
  layer_scale > 0 multiplies each branch by a learned per-channel `gamma_1` /
  `gamma_2` [D] initialised to that value (BEiT, CaiT), before the residual add.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  capture_attention: bool = False
  layer_scale: float = 0.0

  def _drop(self, x, deterministic):
    if deterministic or self.drop_path == 0.0:
      return x
    keep = 1.0 - self.drop_path
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    alive = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return x * alive.astype(x.dtype) / keep

  def _scale(self, name, y):
    if self.layer_scale <= 0:
      return y
    gamma = self.param(name, nn.initializers.constant(self.layer_scale), (y.shape[-1],))
    return y * gamma.astype(y.dtype)

  @nn.compact
  def __call__(self, x, deterministic: bool = True, attention_bias=None):
    y = Attention(self.num_heads, self.dtype, self.attention_impl, self.capture_attention,
                  name="attn")(
        layer_norm("norm1", self.dtype)(x), attention_bias)
    x = x + self._drop(self._scale("gamma_1", y), deterministic)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x))
    return x + self._drop(self._scale("gamma_2", y), deterministic)


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """BEiT's index into the relative position table, class token included.

  Patch pairs (i, j) index their offset (row_i - row_j, col_i - col_j) in a
  (2 rows - 1) x (2 cols - 1) table; the last three entries are class -> patch,
  patch -> class and class -> class, as in BEiT and timm's `Beit`.

  Returns:
    int32[1 + N, 1 + N], values in [0, (2 rows - 1)(2 cols - 1) + 3).
  """
  rows, cols = grid
  num = (2 * rows - 1) * (2 * cols - 1) + 3
  coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]                # [2, N, N]
  patch_index = (rel[0] + rows - 1) * (2 * cols - 1) + (rel[1] + cols - 1)
  index = np.zeros((rows * cols + 1,) * 2, np.int32)
  index[1:, 1:] = patch_index
  index[0, :], index[:, 0], index[0, 0] = num - 3, num - 2, num - 1
  return index


class RelativePositionBias(nn.Module):
  """One table of per-head attention biases by relative offset, shared by all blocks (BEiT).

  Zeros at init, as BEiT-v2's pretraining and timm have it.
  """
  num_heads: int
  grid: tuple[int, int]

  @nn.compact
  def __call__(self, tokens=None):
    """tokens: None (all 1 + N) or int32[B, T], which tokens run (0 = class, 1 + patch id).

    Returns:
      float32[1, heads, 1 + N, 1 + N], or [B, heads, T, T] for `tokens`.
    """
    index = relative_position_index(self.grid)
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (int(index.max()) + 1, self.num_heads))
    index = jnp.asarray(index)
    if tokens is None:
      return jnp.moveaxis(table[index], -1, 0)[None]
    index = index[tokens[:, :, None], tokens[:, None, :]]      # [B, T, T]
    return jnp.moveaxis(table[index], -1, 1)


class ViTEncoder(nn.Module):
  """ViT encoder that runs on the visible patches and reports chosen blocks.

  Attributes:
    patch_size, width, depth, num_heads, mlp_ratio: the architecture.
    feature_blocks: 1-based indices g_i of the supervised blocks (paper: (B/K) i).
    feature_norm: how a supervised block's output becomes f^(g_i): "per_block"
      gives each intermediate block its own LayerNorm (the last block uses the
      final norm `norm`); "final" applies the final norm to every one.
    remat: recompute each block in the backward pass instead of storing it.
    pos_embed: "sincos" (a fixed table, pretraining) or "learned" (a parameter
      [1, 1 + N, width] initialised from the table, fine-tuning and timm), or
      "none" (no absolute positions: BEiT's student, with rel_pos_bias).
    rel_pos_bias: add one shared relative position bias to every block's
      attention logits (`RelativePositionBias`, BEiT's shared table).
    layer_scale: > 0 gives every block per-channel branch scales initialised to it.
    extra_hidden_blocks: 1-based blocks whose raw outputs are also returned
      (BEiT-v2's class-token head reads block 9's patch tokens).
    capture_attention: sow every block's attention probabilities (analysis).

  Mask-token mode (BEiT): with `mask` given, every patch is encoded and the
  embeddings of masked patches are replaced by a learned `mask_token`
  [1, 1, width] before positions are added; the parameter exists only in
  models initialised with a mask, so visible-token encoders keep their tree.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  feature_blocks: Sequence[int] = (3, 6, 9, 12)
  feature_norm: str = "per_block"
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  remat: bool = False
  pos_embed: str = "sincos"
  capture_attention: bool = False
  rel_pos_bias: bool = False
  layer_scale: float = 0.0
  extra_hidden_blocks: Sequence[int] = ()

  @nn.compact
  def __call__(self, images, ids_keep=None, deterministic: bool = True, mask=None):
    """Encodes the visible patches (or all patches, masked ones as [MASK]).

    Args:
      images: float[B, H, W, C], normalised.
      ids_keep: int32[B, Nv], visible patches in raster order; None = all N.
      deterministic: False enables stochastic depth (needs a 'dropout' rng).
      mask: bool[B, N], True = replace by the mask token (BEiT); needs ids_keep=None.

    Returns:
      dict with
        features: [B, K, 1 + Nv, width], f^(g_i) for the supervised blocks (normed).
        hidden: [B, K, 1 + Nv, width], the raw outputs of those blocks.
        final: [B, 1 + Nv, width], the last block's output after `norm`.
        extra_hidden: [B, J, 1 + Nv, width], raw outputs of extra_hidden_blocks (if any).
        attention_bias: [B or 1, heads, 1 + Nv, 1 + Nv], the shared relative
          position bias (if rel_pos_bias), for head blocks outside the encoder.
    """
    b, h, w, _ = images.shape
    p = self.patch_size
    grid = (h // p, w // p)
    table = sincos_pos_embed(self.width, grid)
    if self.pos_embed == "learned":
      pos = self.param("pos_embed", lambda _: jnp.asarray(table)[None])[0]
    elif self.pos_embed == "sincos":
      pos = jnp.asarray(table)
    elif self.pos_embed == "none":
      pos = jnp.zeros(table.shape, jnp.float32)  # adds nothing; XLA folds the zeros away
    else:
      raise ValueError(f"pos_embed={self.pos_embed!r}: allowed {POS_EMBEDS}")
    patches = patchify(images, p)
    patch_pos = jnp.broadcast_to(pos[None, 1:], (b,) + pos[1:].shape)
    if ids_keep is not None:
      # Embed only what is kept: the embedding is per patch, so gathering
      # first saves 3/4 of its FLOPs at 75% masking.
      patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
      patch_pos = jnp.take_along_axis(patch_pos, ids_keep[..., None], axis=1)
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init,
                 name="patch_embed")(patches)
    if mask is not None:
      mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    x = x + patch_pos.astype(self.dtype)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
    cls = jnp.broadcast_to((cls + pos[None, :1]).astype(x.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)

    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    final_norm = layer_norm("norm", self.dtype)
    norms = {g: final_norm if (g == self.depth or self.feature_norm == "final")
             else layer_norm(f"feature_norm_{g}", self.dtype) for g in self.feature_blocks}
    bias = None
    if self.rel_pos_bias:
      tokens = None if ids_keep is None else jnp.concatenate(
          [jnp.zeros((b, 1), ids_keep.dtype), ids_keep + 1], axis=1)
      bias = RelativePositionBias(self.num_heads, grid, name="rel_pos_bias")(tokens)
    dpr = np.linspace(0.0, self.drop_path, self.depth)
    hidden, features, extra = [], [], []
    for i in range(1, self.depth + 1):
      x = block_cls(self.num_heads, self.mlp_ratio, float(dpr[i - 1]), self.dtype,
                    self.attention_impl, self.capture_attention, self.layer_scale,
                    name=f"block_{i - 1}")(x, deterministic, bias)
      if i in norms:
        hidden.append(x)
        features.append(norms[i](x))
      if i in self.extra_hidden_blocks:
        extra.append(x)
    final = features[-1] if self.depth in norms else final_norm(x)
    out = {"features": jnp.stack(features, axis=1), "hidden": jnp.stack(hidden, axis=1),
           "final": final}
    if extra:
      out["extra_hidden"] = jnp.stack(extra, axis=1)
    if bias is not None:
      out["attention_bias"] = bias
    return out
