"""Encoder parameters <-> timm VisionTransformer state dicts (plain NumPy arrays).

timm stores Linear weights as [out, in] and the patch embedding as a conv
[D, C, P, P]; ours are Flax kernels [in, out] and a Dense over flattened
(p, q, c) patches. Position embeddings are not parameters here (fixed sin-cos),
so `pos_embed` is produced on export and checked, not loaded, on import.
"""

from __future__ import annotations

import numpy as np

from ddae_jax.models.vit import sincos_pos_embed


def dense_from_linear(sd, name):
  return {"kernel": np.asarray(sd[f"{name}.weight"]).T, "bias": np.asarray(sd[f"{name}.bias"])}


def _norm_from_timm(sd, name):
  return {"scale": np.asarray(sd[f"{name}.weight"]), "bias": np.asarray(sd[f"{name}.bias"])}


def encoder_params_from_timm(sd: dict, depth: int) -> dict:
  """Our ViTEncoder params from a timm VisionTransformer state dict (tensors as NumPy)."""
  sd = {k: np.asarray(v) for k, v in sd.items()}
  conv = sd["patch_embed.proj.weight"]  # [D, C, P, P]
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                      "bias": sd["patch_embed.proj.bias"]},
      "cls_token": sd["cls_token"],
      "norm": _norm_from_timm(sd, "norm"),
  }
  for i in range(depth):
    b = f"blocks.{i}"
    params[f"block_{i}"] = {
        "norm1": _norm_from_timm(sd, f"{b}.norm1"),
        "attn": {"qkv": dense_from_linear(sd, f"{b}.attn.qkv"),
                 "proj": dense_from_linear(sd, f"{b}.attn.proj")},
        "norm2": _norm_from_timm(sd, f"{b}.norm2"),
        "mlp": {"fc1": dense_from_linear(sd, f"{b}.mlp.fc1"),
                "fc2": dense_from_linear(sd, f"{b}.mlp.fc2")},
    }
  return params


def encoder_params_to_timm(params: dict, depth: int, patch_size: int,
                           grid: tuple[int, int]) -> dict:
  """A timm VisionTransformer state dict (NumPy arrays) from our encoder params."""
  p = {k: v for k, v in params.items()}
  kernel = np.asarray(p["patch_embed"]["kernel"])
  width = kernel.shape[1]
  sd = {
      "cls_token": np.asarray(p["cls_token"]),
      "pos_embed": sincos_pos_embed(width, grid)[None],
      "patch_embed.proj.weight": kernel.reshape(patch_size, patch_size, -1, width)
                                       .transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": np.asarray(p["patch_embed"]["bias"]),
      "norm.weight": np.asarray(p["norm"]["scale"]),
      "norm.bias": np.asarray(p["norm"]["bias"]),
  }
  for i in range(depth):
    blk, b = p[f"block_{i}"], f"blocks.{i}"
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      sd[f"{b}.{theirs}.weight"] = np.asarray(blk[ours]["scale"])
      sd[f"{b}.{theirs}.bias"] = np.asarray(blk[ours]["bias"])
    for mod, name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
      sd[f"{b}.{mod}.{name}.weight"] = np.asarray(blk[mod][name]["kernel"]).T
      sd[f"{b}.{mod}.{name}.bias"] = np.asarray(blk[mod][name]["bias"])
  return sd
