"""Encoder parameters <-> PyTorch ViT state dicts (timm, MAE), as NumPy arrays.

The state dict layouts (D width, P patch, N patches, C classes, i < depth):

  timm (`vit_{small,base,large}_patch16_224`, `timm.create_model(..., num_classes=0)`):
    cls_token [1, 1, D]               pos_embed [1, 1 + N, D]
    patch_embed.proj.weight [D, 3, P, P]  patch_embed.proj.bias [D]
    blocks.{i}.norm1.{weight,bias} [D]    blocks.{i}.norm2.{weight,bias} [D]
    blocks.{i}.attn.qkv.weight [3D, D]    blocks.{i}.attn.qkv.bias [3D]
    blocks.{i}.attn.proj.weight [D, D]    blocks.{i}.attn.proj.bias [D]
    blocks.{i}.mlp.fc1.weight [4D, D]     blocks.{i}.mlp.fc1.bias [4D]
    blocks.{i}.mlp.fc2.weight [D, 4D]     blocks.{i}.mlp.fc2.bias [D]
    norm.{weight,bias} [D]
    head.weight [C, D], head.bias [C]     only when C > 0 (zeros on export)
  mae_vit: MAE's `models_vit` with global_pool=True (and timm's global_pool="avg"):
    the same keys with `fc_norm` in place of `norm`.
  mae_pretrain: MAE's `mae_pretrain_vit_*.pth`: {"model": <timm keys>}; MAE's own
    pretraining checkpoints add decoder keys (`decoder_*`, `mask_token`), which
    import drops (this repository's decoders are a different architecture).
  beit: timm's `Beit` as `beit_base_patch16_224` builds it (BEiT-v2 students:
    no pos_embed, a relative position table per block, layer scale, mean pooling):
    cls_token, patch_embed.proj.*, fc_norm.{weight,bias} [D] (our final norm), and
    blocks.{i}.gamma_1, gamma_2 [D]        blocks.{i}.attn.q_bias, v_bias [D]
    blocks.{i}.attn.relative_position_bias_table [(2 rows - 1)(2 cols - 1) + 3, heads]
    blocks.{i}.attn.qkv.weight [3D, D] (no bias), and the other block keys of timm.
    Our one shared table is written into every block, as BEiT's fine-tuning does.

Ours are Flax kernels [in, out] and a Dense over flattened (p, q, c) patches;
timm's Linear weights are [out, in] and its patch embedding a conv [D, C, P, P].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax.models.vit import sincos_pos_embed
from ddae_jax.weights.pretrained import CheckpointMismatch
from ddae_jax.weights.shapes import check_shapes, shapes_of

LAYOUTS = ("timm", "mae_vit", "mae_pretrain", "beit")
_LINEARS = (("attn", "qkv", 3), ("attn", "proj", 1), ("mlp", "fc1", 4), ("mlp", "fc2", 1))
_DECODER_PREFIXES = ("decoder_", "mask_token")


class StateDictMismatch(CheckpointMismatch):
  """A state dict is not the ViT it should be: the message lists names and shapes."""


def dense_from_linear(sd, name):
  return {"kernel": np.asarray(sd[f"{name}.weight"]).T, "bias": np.asarray(sd[f"{name}.bias"])}


def _final_norm(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: allowed {LAYOUTS}")
  return "fc_norm" if layout in ("mae_vit", "beit") else "norm"


def timm_shapes(width: int, depth: int, patch_size: int, num_patches: int,
                layout: str = "timm", num_classes: int = 0) -> dict[str, tuple]:
  """{key: shape} of the state dict a layout holds (the table in the module docstring)."""
  d = width
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + num_patches, d),
            "patch_embed.proj.weight": (d, 3, patch_size, patch_size),
            "patch_embed.proj.bias": (d,)}
  for i in range(depth):
    for norm in ("norm1", "norm2"):
      shapes[f"blocks.{i}.{norm}.weight"] = shapes[f"blocks.{i}.{norm}.bias"] = (d,)
    for mod, name, mult in _LINEARS:
      # fc2 maps 4D back to D; the others map D to mult * D.
      out, inp = (d, 4 * d) if name == "fc2" else (mult * d, d)
      shapes[f"blocks.{i}.{mod}.{name}.weight"] = (out, inp)
      shapes[f"blocks.{i}.{mod}.{name}.bias"] = (out,)
  norm = _final_norm(layout)
  shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (d,)
  if num_classes:
    shapes.update({"head.weight": (num_classes, d), "head.bias": (num_classes,)})
  return shapes


def check_state_dict(found: dict, expected: dict[str, tuple], what: str) -> None:
  """Raises StateDictMismatch listing every missing, unexpected or misshapen key.

  Args:
    found: {key: array} as read.
    expected: {key: shape} from `timm_shapes`.
    what: how the message names the architecture, e.g. "ViT-base/16 (timm layout)".
  """
  check_shapes(shapes_of(found), expected, StateDictMismatch, f"the state dict is not a {what}")


def split_state_dict(raw: dict) -> tuple[dict, list[str]]:
  """(the encoder's tensors under timm's names, notes on what was changed or dropped).

  Unwraps MAE's {"model": ...} (and {"state_dict": ...}), strips DDP's `module.`
  prefix, drops MAE's pretraining decoder and any classifier head (our
  encoders have neither), and renames MAE's `fc_norm` to `norm`.
  """
  notes = []
  for wrapper in ("model", "state_dict"):
    if isinstance(raw.get(wrapper), dict):
      notes.append(f"read the state dict under {wrapper!r}")
      raw = raw[wrapper]
  sd = {k.removeprefix("module."): v for k, v in raw.items()}
  decoder = sorted(k for k in sd if k.startswith(_DECODER_PREFIXES))
  head = sorted(k for k in sd if k.startswith("head."))
  for keys, why in ((decoder, "MAE pretraining decoder"), (head, "classifier head")):
    if keys:
      notes.append(f"dropped the {why}: " + ", ".join(
          f"{k} {tuple(np.shape(sd[k]))}" for k in keys[:6]) + (" ..." if len(keys) > 6 else ""))
  sd = {k: v for k, v in sd.items() if k not in set(decoder) | set(head)}
  if "fc_norm.weight" in sd and "norm.weight" not in sd:
    # MAE global_pool applies fc_norm to the mean of the patch tokens; our
    # encoder norms every token, so the same affine LayerNorm moves there.
    notes.append("renamed fc_norm (MAE global pooling) to norm (applied to every token)")
    sd = {("norm" + k[len("fc_norm"):] if k.startswith("fc_norm.") else k): v
          for k, v in sd.items()}
  return sd, notes


def infer_architecture(sd: dict) -> dict:
  """{width, depth, patch_size, grid} read off a timm-named state dict's shapes."""
  conv = sd.get("patch_embed.proj.weight")
  if conv is None or np.ndim(conv) != 4 or np.shape(conv)[1] != 3:
    raise StateDictMismatch(
        "not a ViT state dict: expected patch_embed.proj.weight [D, 3, P, P], found "
        f"{None if conv is None else tuple(np.shape(conv))}; its first keys: {sorted(sd)[:8]}")
  width, _, patch, _ = np.shape(conv)
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  grid = None
  if "pos_embed" in sd:
    n = np.shape(sd["pos_embed"])[1] - 1
    side = math.isqrt(n)
    if side * side != n:
      raise StateDictMismatch(f"pos_embed {tuple(np.shape(sd['pos_embed']))} holds {n} patch "
                              "positions, not a square grid (with one class-token row)")
    grid = (side, side)
  return {"width": int(width), "depth": depth, "patch_size": int(patch), "grid": grid}


def resample_pos_embed(pos: np.ndarray, new_grid: tuple[int, int],
                       old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Bicubic resampling of a position table to another grid, class-token row kept.

  The same as timm's `resample_abs_pos_embed` (bicubic, antialias=True: PIL's
  cubic kernel with renormalised edge weights, which `jax.image.resize` also uses).

  Args:
    pos: [1, 1 + old_rows * old_cols, D].
    new_grid: (rows, cols) wanted.
    old_grid: the table's grid; None = square.

  Returns:
    float32[1, 1 + rows * cols, D].
  """
  pos = np.asarray(pos, np.float32)
  n, d = pos.shape[1] - 1, pos.shape[2]
  if old_grid is None:
    old_grid = (math.isqrt(n), math.isqrt(n))
  if tuple(old_grid) == tuple(new_grid):
    return pos
  table = pos[0, 1:].reshape(old_grid[0], old_grid[1], d)
  resized = jax.image.resize(jnp.asarray(table), (new_grid[0], new_grid[1], d), "bicubic",
                             antialias=True)
  patches = np.asarray(resized, np.float32).reshape(1, -1, d)
  return np.concatenate([pos[:, :1], patches], axis=1)


def encoder_params_from_timm(sd: dict, depth: int, grid: tuple[int, int] | None = None) -> dict:
  """Our ViTEncoder params (pos_embed="learned") from a timm state dict (NumPy arrays).

  Args:
    sd: timm names (see the module docstring; `split_state_dict` first for MAE's).
    depth: number of blocks.
    grid: the patch grid the encoder will run at; pos_embed is resampled to it.
  """
  sd = {k: np.asarray(v) for k, v in sd.items()}
  conv = sd["patch_embed.proj.weight"]  # [D, C, P, P] -> [(p, q, c), D], our patch order
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                      "bias": sd["patch_embed.proj.bias"]},
      "cls_token": sd["cls_token"],
      "pos_embed": (sd["pos_embed"] if grid is None
                    else resample_pos_embed(sd["pos_embed"], grid)),
      "norm": {"scale": sd["norm.weight"], "bias": sd["norm.bias"]},
  }
  for i in range(depth):
    b = f"blocks.{i}"
    block = {n: {"scale": sd[f"{b}.{n}.weight"], "bias": sd[f"{b}.{n}.bias"]}
             for n in ("norm1", "norm2")}
    for mod, name, _ in _LINEARS:
      block.setdefault(mod, {})[name] = {"kernel": sd[f"{b}.{mod}.{name}.weight"].T,
                                         "bias": sd[f"{b}.{mod}.{name}.bias"]}
    params[f"block_{i}"] = block
  return params


def encoder_params_to_timm(params: dict, depth: int, patch_size: int, grid: tuple[int, int],
                           layout: str = "timm", num_classes: int = 0) -> dict:
  """A state dict (NumPy arrays, timm/MAE names) from our encoder params.

  Args:
    params: ViTEncoder params. Pretraining's `feature_norm_{g}` LayerNorms (they
      only feed the decoders) are left out: a timm ViT has no place for them.
    grid: the patch grid of the exported model. A learned `pos_embed` param is
      resampled to it; without one the fixed sin-cos table of that grid is used.
    layout: "timm" or "mae_pretrain" (final `norm`) or "mae_vit" (`fc_norm`).
    num_classes: > 0 adds a zero-initialised head.weight [C, D] and head.bias [C].
  """
  norm = _final_norm(layout)
  p = jax.tree.map(np.asarray, params)
  kernel = p["patch_embed"]["kernel"]
  width = kernel.shape[1]
  pos = (resample_pos_embed(p["pos_embed"], grid) if "pos_embed" in p
         else sincos_pos_embed(width, grid)[None])
  sd = {
      "cls_token": p["cls_token"],
      "pos_embed": pos,
      "patch_embed.proj.weight": kernel.reshape(patch_size, patch_size, -1, width)
                                       .transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": p["patch_embed"]["bias"],
      f"{norm}.weight": p["norm"]["scale"],
      f"{norm}.bias": p["norm"]["bias"],
  }
  for i in range(depth):
    blk, b = p[f"block_{i}"], f"blocks.{i}"
    for n in ("norm1", "norm2"):
      sd[f"{b}.{n}.weight"], sd[f"{b}.{n}.bias"] = blk[n]["scale"], blk[n]["bias"]
    for mod, name, _ in _LINEARS:
      sd[f"{b}.{mod}.{name}.weight"] = blk[mod][name]["kernel"].T
      sd[f"{b}.{mod}.{name}.bias"] = blk[mod][name]["bias"]
  if num_classes:
    # Zeros: a fresh classifier, as fine-tuning recipes re-initialise it anyway.
    sd["head.weight"] = np.zeros((num_classes, width), np.float32)
    sd["head.bias"] = np.zeros((num_classes,), np.float32)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


# ------------------------------------------------------------------ BEiT (timm's Beit)
BEIT_TABLE = "attn.relative_position_bias_table"


def beit_shapes(width: int, depth: int, patch_size: int, grid: tuple[int, int], heads: int,
                num_classes: int = 0) -> dict[str, tuple]:
  """{key: shape} of the `beit` layout (module docstring)."""
  d, table = width, ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads)
  shapes = {k: v for k, v in timm_shapes(width, depth, patch_size, 0, "beit", num_classes).items()
            if k != "pos_embed" and not k.endswith("attn.qkv.bias")}
  for i in range(depth):
    b = f"blocks.{i}"
    shapes.update({f"{b}.gamma_1": (d,), f"{b}.gamma_2": (d,), f"{b}.attn.q_bias": (d,),
                   f"{b}.attn.v_bias": (d,), f"{b}.{BEIT_TABLE}": table})
  return shapes


def encoder_params_to_beit(params: dict, depth: int, patch_size: int,
                           num_classes: int = 0) -> dict:
  """A timm `Beit` state dict (NumPy) from a BEiT student's encoder params.

  The key bias of our fused qkv is dropped: it adds q . b_k to every logit of a
  query row, which the softmax cancels, so attention is unchanged (BEiT fixes it at 0).
  """
  p = jax.tree.map(np.asarray, params)
  if "rel_pos_bias" not in p or "gamma_1" not in p["block_0"] or "pos_embed" in p:
    raise StateDictMismatch(
        "the beit layout needs a BEiT student (model.pos_embed='none', model.rel_pos_bias, "
        "model.layer_scale > 0); this encoder is a plain ViT: export it with layout timm")
  sd = encoder_params_to_timm({k: v for k, v in p.items() if k != "rel_pos_bias"}, depth,
                              patch_size, (1, 1), "beit", num_classes)
  del sd["pos_embed"]
  table = p["rel_pos_bias"]["relative_position_bias_table"]
  width = p["patch_embed"]["kernel"].shape[1]
  for i in range(depth):
    blk, b = p[f"block_{i}"], f"blocks.{i}"
    qkv_bias = sd.pop(f"{b}.attn.qkv.bias")
    sd.update({f"{b}.gamma_1": blk["gamma_1"], f"{b}.gamma_2": blk["gamma_2"],
               f"{b}.attn.q_bias": qkv_bias[:width], f"{b}.attn.v_bias": qkv_bias[2 * width:],
               f"{b}.{BEIT_TABLE}": table})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def encoder_params_from_beit(sd: dict, depth: int) -> dict:
  """Our BEiT student's encoder params from a timm `Beit` state dict (shared or equal tables).

  Raises StateDictMismatch when the per-block tables differ (a fine-tuned BEiT):
  our encoder holds one table for all blocks.
  """
  sd = {k: np.asarray(v) for k, v in sd.items()}
  tables = [sd.get("rel_pos_bias.relative_position_bias_table")] if (
      "rel_pos_bias.relative_position_bias_table" in sd) else [
          sd[f"blocks.{i}.{BEIT_TABLE}"] for i in range(depth)]
  if any(not np.array_equal(t, tables[0]) for t in tables):
    raise StateDictMismatch("the blocks' relative position tables differ; this encoder "
                            "shares one table between all blocks")
  width = sd["patch_embed.proj.weight"].shape[0]
  timm_sd = {k: v for k, v in sd.items() if "relative_position" not in k}
  timm_sd["pos_embed"] = np.zeros((1, 1, width), np.float32)  # dropped below
  timm_sd["norm.weight"], timm_sd["norm.bias"] = sd["fc_norm.weight"], sd["fc_norm.bias"]
  for i in range(depth):
    b = f"blocks.{i}"
    timm_sd[f"{b}.attn.qkv.bias"] = np.concatenate(
        [sd[f"{b}.attn.q_bias"], np.zeros_like(sd[f"{b}.attn.q_bias"]), sd[f"{b}.attn.v_bias"]])
  params = encoder_params_from_timm(timm_sd, depth)
  del params["pos_embed"]
  params["rel_pos_bias"] = {"relative_position_bias_table": tables[0]}
  for i in range(depth):
    params[f"block_{i}"].update(gamma_1=sd[f"blocks.{i}.gamma_1"],
                                gamma_2=sd[f"blocks.{i}.gamma_2"])
  return params
