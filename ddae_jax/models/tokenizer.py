"""BEiT-v2's visual tokenizer (VQ-KD), the half that makes the pretraining targets.

VQ-KD (Peng et al. 2022, microsoft/unilm beit2/modeling_vqkd.py) encodes an
image with a ViT-B/16, projects every patch token to a 32-d code
(`encode_task_layer`: Linear, Tanh, Linear), L2-normalises it and picks the
nearest entry of an 8192 x 32 codebook (norm_ema_quantizer.py). The indices
are BEiT-v2's targets. The tokenizer's decoder and its CLIP teacher only serve
to train the tokenizer, so they are not built here; the converter
(`ddae_jax/weights/vqkd.py`) skips their weights.

The encoder is our `ViTEncoder` with learned absolute positions: the
checkpoint's separate `q_bias`/`v_bias` become the fused qkv bias with a zero
key bias (BEiT's attention has no key bias), and its `fc_norm` (applied to the
patch tokens; its `norm` is the identity) becomes `norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddae_jax.models.vit import VIT_SIZES, ViTEncoder, dense_init


def tokenizer_input(images: jax.Array) -> jax.Array:
  """VQ-KD's `pre_process` ('default'): uint8 [B, H, W, 3] in 0..255 -> float32 in [-1, 1].

  BEiT-v2 gives the tokenizer the un-normalised crop (ToTensor only) and VQ-KD
  maps it to x * 255 / 127.5 - 1; the student sees ImageNet-standardised pixels.
  """
  x = images.astype(jnp.float32)
  if images.dtype != jnp.uint8:
    x = x * 255.0  # floats in [0, 1]
  return x / 127.5 - 1.0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VQKDTokenizer(nn.Module):
  """Image -> codebook indices.

  Attributes:
    size: the tokenizer's ViT, a VIT_SIZES name (public: "base", patch 16).
    code_dim: width of the codes (32).
    vocab_size: codebook entries (8192).
    dtype: the ViT's compute dtype; the task layer and quantiser stay float32.
  """
  patch_size: int = 16
  size: str = "base"
  code_dim: int = 32
  vocab_size: int = 8192
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """Tokenises images.

    Args:
      images: float32[B, H, W, 3] in [-1, 1] (`tokenizer_input`).

    Returns:
      dict with
        codes: float32[B, N, code_dim], the L2-normalised projections z.
        indices: int32[B, N], argmin_j ||z - e_j||^2 over the codebook e.
    """
    width, depth, heads = VIT_SIZES[self.size]
    encoder = ViTEncoder(patch_size=self.patch_size, width=width, depth=depth,
                         num_heads=heads, feature_blocks=(depth,), feature_norm="final",
                         dtype=self.dtype, pos_embed="learned", name="encoder")
    tokens = encoder(images)["final"][:, 1:]
    # VQ-KD runs the task layer and the quantiser in float32 (autocast off).
    x = nn.Dense(width, kernel_init=dense_init,
                 name="encode_task_layer_0")(tokens.astype(jnp.float32))
    x = nn.Dense(self.code_dim, kernel_init=dense_init, name="encode_task_layer_2")(jnp.tanh(x))
    codes = l2_normalize(x)
    codebook = self.param(
        "codebook", lambda k, s: l2_normalize(jax.random.normal(k, s)),
        (self.vocab_size, self.code_dim))
    # The quantiser's distance, written out as it is (the codebook rows are unit
    # length in trained checkpoints, but the argmin does not rely on it).
    dist = (jnp.sum(codes ** 2, axis=-1, keepdims=True) + jnp.sum(codebook ** 2, axis=-1)
            - 2.0 * jnp.einsum("bnd,vd->bnv", codes, codebook))
    return {"codes": codes, "indices": jnp.argmin(dist, axis=-1).astype(jnp.int32)}
