"""Model FLOPs of one DDAE training step per image, and chips' peak rates, for MFU.

Counted analytically: only matrix products (2 FLOPs per multiply-add), the
convention of MFU. A training pass costs 3x its forward (forward, and the
backward's two products); the momentum encoder runs forward only.

  linear, T tokens, a -> b:       2 T a b
  transformer block, width D:     24 T D^2 (qkv, proj, 2 MLP layers at 4D)
                                  + 4 T^2 D (QK^T and AV)
"""

from __future__ import annotations

import jax

from ddae_jax import config_lib
from ddae_jax.models.vit import VIT_SIZES

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
}


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  return 2 * tokens * width * width * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * width


def encoder_forward_flops(tokens: int, width: int, depth: int, patch_dim: int) -> float:
  """Patch embedding of tokens - 1 patches, then `depth` blocks on `tokens` tokens."""
  return 2 * (tokens - 1) * patch_dim * width + depth * block_flops(tokens, width)


def decoder_forward_flops(in_tokens: int, num_patches: int, in_width: int, width: int,
                          depth: int, out_dim: int) -> float:
  tokens = num_patches + 1
  return (2 * in_tokens * in_width * width + depth * block_flops(tokens, width)
          + 2 * num_patches * width * out_dim)


def beitv2_forward_flops_per_image(config, d: config_lib.Derived) -> dict:
  """BEiT-v2: the encoder on all patches, the head on the masked ones of K blocks, the
  class-token head's blocks on all tokens and its LM head on the masked ones, the tokenizer."""
  width, n, blocks = d.width, d.num_patches, d.blocks
  patch_dim = config.model.patch_size ** 2 * 3
  t = config.tokenizer
  t_width, t_depth, _ = VIT_SIZES[t.size]
  lm_head = 2 * d.num_masked * width * t.vocab_size
  parts = {
      "encoder": encoder_forward_flops(n + 1, width, max(blocks), patch_dim),
      "lm_head": len(blocks) * lm_head,
      # ViT, task layer (D -> D -> code_dim), distances to every code.
      "tokenizer": (encoder_forward_flops(n + 1, t_width, t_depth, patch_dim)
                    + 2 * n * t_width * (t_width + t.code_dim)
                    + 2 * n * t.code_dim * t.vocab_size),
  }
  if config.cls_pt.early_block:
    parts["cls_pt_head"] = config.cls_pt.head_depth * block_flops(n + 1, width) + lm_head
  return parts


def forward_flops_per_image(config, d: config_lib.Derived) -> dict:
  """Forward FLOPs per image of each part of the step (decoders: all their block passes);
  d: the config's resolved values (config_lib.resolve)."""
  if config.get("method", "ddae") == "beitv2":
    return beitv2_forward_flops_per_image(config, d)
  width, n = d.width, d.num_patches
  visible = n - d.num_masked
  patch_dim = config.model.patch_size ** 2 * 3
  used_depth = max(d.blocks)  # blocks after the last supervised one never run
  parts = {"encoder": encoder_forward_flops(visible + 1, width, used_depth, patch_dim)}
  # A branch without DDS (Table 4) decodes the last block only.
  branch_k = lambda b: len(d.branches[b].blocks)
  if config.pixel.enabled:
    p = config.pixel
    parts["pixel_decoder"] = branch_k("pixel") * decoder_forward_flops(
        visible + 1, n, width, p.decoder_width, p.decoder_depth, patch_dim)
  if config.distill.enabled:
    parts["momentum_encoder"] = encoder_forward_flops(n + 1, width, used_depth, patch_dim)
    parts["distill_decoder"] = branch_k("distill") * decoder_forward_flops(
        visible + 1, n, width, width, config.distill.decoder_depth, width)
  return parts


def train_flops_per_image(config, d: config_lib.Derived) -> dict:
  """FLOPs per image of one train step, by part, and their "total".

  Trained parts cost 3x their forward; the frozen ones (momentum encoder,
  tokenizer) only their forward.
  """
  parts = {name: f * (1 if name in ("momentum_encoder", "tokenizer") else 3)
           for name, f in forward_flops_per_image(config, d).items()}
  parts["total"] = sum(parts.values())
  return parts


def peak_tflops(device=None) -> float | None:
  """The chip's dense bf16 peak, or None when unknown (e.g. CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None


# ------------------------------------------------------- bytes: the fusion floor
# What a step must move to and from HBM if every matrix product reads its two
# operands and writes its result once, in bfloat16, and everything between
# products (norms, GELU, softmax, residual adds, casts) is fused into them:
# no real step moves less without fusing products together (flash attention
# fuses QK^T, softmax and AV). Its FLOP/byte is the ceiling on the compiled
# step's; BENCHMARKS.md compares the two.
ACTIVATION_BYTES = 2            # bfloat16
TRAINED_PARAM_BYTES = 32        # f32 parameter, gradient, Adam mu and nu: each read and written
MOMENTUM_PARAM_BYTES = 8        # eq. 4 reads and writes theta' (theta is read above)


def _linear_bytes(tokens, a, b, weight_share):
  """[T, a] x [a, b] -> [T, b]: activations per image, the weight once per weight_share images."""
  return ACTIVATION_BYTES * (tokens * (a + b) + a * b / weight_share)


def block_bytes(tokens: int, width: int, heads: int, weight_share: float,
                mlp_ratio: float = 4.0, fused_attention: bool = False) -> float:
  """One forward pass of a block at the fusion floor, per image: qkv, proj and the MLP's
  products, and attention's two per-head products (their [heads, T, T] result written by
  QK^T and read by AV). fused_attention: the two products and the softmax are one kernel
  (models/short_attention.py), which reads q, k, v and writes the output only."""
  hidden = int(width * mlp_ratio)
  products = (_linear_bytes(tokens, width, 3 * width, weight_share)
              + _linear_bytes(tokens, width, width, weight_share)
              + _linear_bytes(tokens, width, hidden, weight_share)
              + _linear_bytes(tokens, hidden, width, weight_share))
  logits = 0 if fused_attention else 2 * heads * tokens * tokens
  attention = ACTIVATION_BYTES * (4 * tokens * width + logits)
  return products + attention


def floor_bytes_per_image(config, d: config_lib.Derived, per_chip_batch: float,
                          fused_attention: bool = False) -> dict | None:
  """The fusion floor of one DDAE/MAE train step per image, by part, and its "total".

  Trained parts move 3x their forward (as in FLOPs: the backward's two products touch
  the same three tensors), the momentum encoder 1x; the K decoder passes share each
  weight (one batched call). "optimizer" is the parameter update's traffic. None for
  BEiT-v2 (not modelled). fused_attention: as block_bytes.
  """
  if config.get("method", "ddae") == "beitv2":
    return None
  width, heads, n = d.width, d.heads, d.num_patches
  visible = n - d.num_masked
  patch_dim = config.model.patch_size ** 2 * 3
  depth = max(d.blocks)
  branch_k = lambda b: len(d.branches[b].blocks)
  share = float(per_chip_batch)

  def encoder(tokens):
    return (_linear_bytes(tokens - 1, patch_dim, width, share)
            + depth * block_bytes(tokens, width, heads, share, fused_attention=fused_attention))

  def decoder(k, dec_width, dec_heads, dec_depth, out_dim):
    one = (_linear_bytes(visible + 1, width, dec_width, share * k)
           + dec_depth * block_bytes(n + 1, dec_width, dec_heads, share * k,
                                     fused_attention=fused_attention)
           + _linear_bytes(n, dec_width, out_dim, share * k))
    return k * one

  block_params = lambda d: (4 + 2 * 4.0) * d * d
  encoder_params = patch_dim * width + depth * block_params(width)
  trained_params = encoder_params
  parts = {"encoder": 3 * encoder(visible + 1)}
  if config.pixel.enabled:
    p = config.pixel
    parts["pixel_decoder"] = 3 * decoder(branch_k("pixel"), p.decoder_width, p.decoder_heads,
                                         p.decoder_depth, patch_dim)
    trained_params += (width * p.decoder_width + p.decoder_depth * block_params(p.decoder_width)
                       + p.decoder_width * patch_dim)
  momentum_params = 0
  if config.distill.enabled:
    parts["momentum_encoder"] = encoder(n + 1)
    parts["distill_decoder"] = 3 * decoder(branch_k("distill"), width, heads,
                                           config.distill.decoder_depth, width)
    trained_params += (width * width + config.distill.decoder_depth * block_params(width)
                       + width * width)
    momentum_params = encoder_params
  parts["optimizer"] = (TRAINED_PARAM_BYTES * trained_params
                        + MOMENTUM_PARAM_BYTES * momentum_params) / share
  parts["total"] = sum(parts.values())
  return parts
