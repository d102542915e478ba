"""The light decoders d_phi of eq. 1, 3 and 5: MAE's decoder layout.

A decoder embeds the encoder's visible tokens to its own width, puts a shared
learnable [MASK] token at every masked position, restores raster order, adds
its own sin-cos positions, runs a few pre-norm blocks and predicts one vector
per patch: pixels for the regression decoder d_phi_p, encoder features for the
distillation decoder d_phi_d.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddae_jax.models.vit import Block, dense_init, layer_norm, sincos_pos_embed


class Decoder(nn.Module):
  """Attributes: width, depth, num_heads, mlp_ratio of the blocks; out_dim of the head."""
  width: int = 512
  depth: int = 2
  num_heads: int = 16
  out_dim: int = 768
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, ids_restore, grid):
    """Predicts every patch from the encoded visible tokens.

    Args:
      tokens: [B, 1 + Nv, D_enc], class token first, visible patches in raster order.
      ids_restore: int32[B, N], from `masking.visible_and_masked_ids`.
      grid: static (rows, cols) of the patch grid, rows * cols = N.

    Returns:
      [B, N, out_dim], predictions for all patches in raster order (the loss
      keeps the masked ones).
    """
    b, n = ids_restore.shape
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init,
                 name="embed")(tokens)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (1, 1, self.width))
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(sincos_pos_embed(self.width, grid))[None].astype(x.dtype)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, 0.0, self.dtype, self.attention_impl,
                    name=f"block_{i}")(x, True)
    x = layer_norm("norm", self.dtype)(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init,
                    name="head")(x[:, 1:])


def decode_per_block(decoder: Decoder, params, features: jax.Array,
                     ids_restore: jax.Array, grid) -> jax.Array:
  """One shared decoder applied to every supervised block as one batched pass.

  The K blocks are folded into the batch, batch-major, so a batch sharded over
  devices stays sharded the same way ([B, K] -> [B * K] keeps B outermost).

  Args:
    features: [B, K, 1 + Nv, D], the encoder's f^(g_i).
    ids_restore: int32[B, N].

  Returns:
    [B, K, N, out_dim].
  """
  b, k = features.shape[:2]
  flat = features.reshape((b * k,) + features.shape[2:])
  out = decoder.apply(params, flat, jnp.repeat(ids_restore, k, axis=0), grid)
  return out.reshape((b, k) + out.shape[1:])
