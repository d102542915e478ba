"""Encoders to and from the PyTorch ecosystem: timm and MAE checkpoints.

The library of `python -m ddae_jax.convert`; its usage and options: ddae_jax/convert.py.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddae_jax import config_checks, config_lib, methods
from ddae_jax.models.vit import VIT_SIZES
from ddae_jax.weights import pretrained, state_dict, torch_vit
from ddae_jax.weights.checkpoints import CheckpointMissing
from ddae_jax.weights.state_dict import ConvertError, read_state_dict, write_state_dict


# ----------------------------------------------------------------- export
def _size_name(width: int, depth: int) -> str:
  """The VIT_SIZES name of a (width, depth), or a ConvertError listing the sizes."""
  for name, (w, d, _) in VIT_SIZES.items():
    if (w, d) == (width, depth):
      return name
  raise ConvertError(
      f"a ViT of width {width} and depth {depth} is none of the sizes this repository builds: "
      + ", ".join(f"{s} (width {w}, depth {d})" for s, (w, d, _) in VIT_SIZES.items()))


def _square_side(num_patches: int) -> int:
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ConvertError(f"{num_patches} positions are not a square grid: pass --image_size")
  return side


def timm_recipe(size: str, patch: int, image_size: int, num_classes: int, layout: str) -> str:
  """The PyTorch line that builds the model an export loads into with strict=True."""
  width, depth, heads = VIT_SIZES[size]
  if layout == "beit":
    if size in ("base", "large") and image_size in (224, 384, 512):
      return (f"timm.create_model('beit_{size}_patch{patch}_{image_size}', "
              f"num_classes={num_classes})")
    return (f"timm.models.beit.Beit(img_size={image_size}, patch_size={patch}, "
            f"embed_dim={width}, depth={depth}, num_heads={heads}, num_classes={num_classes}, "
            "use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)")
  if layout == "mae_vit":
    return (f"models_vit.vit_{size}_patch{patch}(num_classes={num_classes}, global_pool=True)"
            f"  # MAE's repository; timm: global_pool='avg'")
  if size in ("small", "base", "large"):
    model = f"timm.create_model('vit_{size}_patch{patch}_{image_size}', num_classes={num_classes})"
  else:
    model = (f"timm.models.vision_transformer.VisionTransformer(img_size={image_size}, "
             f"patch_size={patch}, embed_dim={width}, depth={depth}, num_heads={heads}, "
             f"num_classes={num_classes})")
  # mae_pretrain nests the same keys: MAE's main_finetune.py --finetune reads it.
  return model + ("  # load torch.load(FILE)['model']" if layout == "mae_pretrain" else "")


def _expected_encoder(config, image_size: int) -> dict:
  """ShapeDtypeStructs of the encoder the run's config builds (every method's encoder)."""
  encoder = methods.make_encoder(config, config_lib.resolve(config))
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(encoder.init, jax.random.key(0), images)["params"]


def export_checkpoint(workdir, out, which: str = "online", layout: str = "timm",
                      num_classes: int = 0, image_size: int | None = None,
                      step: int | None = None) -> dict:
  """Writes a run's encoder as a timm/MAE state dict; returns a summary.

  Args:
    workdir: a pretraining or imported workdir (or a bare checkpoint directory
      together with `image_size`).
    out: `.safetensors`, `.pth` or `.pt`.
    which: "online" (theta) or "ema" (theta').
    layout: one of torch_vit.LAYOUTS.
    num_classes: > 0 adds a zero-initialised head [C, D].
    image_size: resolution of the exported position table (default: the run's).
  """
  if layout not in torch_vit.LAYOUTS:
    raise ConvertError(f"--layout={layout!r}: allowed {torch_vit.LAYOUTS}")
  if num_classes < 0:
    raise ConvertError(f"--num_classes={num_classes}: allowed 0 (no head) or more")
  if layout == "mae_pretrain" and state_dict.suffix(out) in state_dict.SAFETENSORS:
    raise ConvertError("--layout=mae_pretrain nests the state dict under 'model' and a "
                       "safetensors file is one flat dict: write a .pth file")
  config = pretrained.load_config(workdir)
  params, step = pretrained.load_encoder(workdir, which, step)
  arch = pretrained.describe(params)
  if config is not None:
    if "pos_embed" not in config.model:  # runs from before the field existed
      config.model.pos_embed = "learned" if "pos_embed" in params else "sincos"
    # mask_token: BEiT's pretraining-only input embedding, which exports drop.
    pretrained.check_encoder(params, _expected_encoder(config, config.model.image_size),
                             ignore=("mask_token",))
    image_size = image_size or config.model.image_size
  elif image_size is None:
    if arch["num_patches"] is None:
      raise ConvertError(f"{workdir} has no config.json and the encoder no position table: "
                         "pass --image_size")
    image_size = _square_side(arch["num_patches"]) * arch["patch_size"]
  patch, size = arch["patch_size"], _size_name(arch["width"], arch["depth"])
  if image_size % patch:
    raise ConvertError(f"--image_size={image_size} is not a multiple of the patch size {patch}")
  grid = (image_size // patch, image_size // patch)
  sd = _export_state_dict(params, arch, grid, layout, num_classes)
  recipe = timm_recipe(size, patch, image_size, num_classes, layout)
  write_state_dict(sd, out, nest_under="model" if layout == "mae_pretrain" else None,
                   metadata={"layout": layout, "create": recipe, "step": str(step),
                             "encoder": which})
  dropped = sorted(k for k in params if k.startswith("feature_norm_") or k == "mask_token")
  return {"out": str(out), "step": step, "encoder": which, "layout": layout,
          "tensors": len(sd), "create": recipe, "dropped": dropped}


def _export_state_dict(params, arch, grid, layout, num_classes) -> dict:
  """The layout's state dict; a BEiT student only as `beit`, at its own grid."""
  beit_student = "rel_pos_bias" in params or "gamma_1" in params["block_0"]
  if beit_student != (layout == "beit"):
    raise ConvertError(
        "this encoder is BEiT's student (relative position bias, layer scale): export it "
        "with --layout=beit" if beit_student else
        "--layout=beit needs BEiT's student (model.rel_pos_bias, model.layer_scale > 0, "
        "model.pos_embed='none'); this encoder is a plain ViT: use --layout=timm")
  if layout != "beit":
    return torch_vit.encoder_params_to_timm(params, arch["depth"], arch["patch_size"], grid,
                                               layout, num_classes)
  table = np.shape(params["rel_pos_bias"]["relative_position_bias_table"])[0]
  if table != (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3:
    raise ConvertError("--image_size must be the run's own for --layout=beit: the relative "
                       "position table is not resampled")
  try:
    return torch_vit.encoder_params_to_beit(params, arch["depth"], arch["patch_size"],
                                               num_classes)
  except torch_vit.StateDictMismatch as err:
    raise ConvertError(str(err)) from None


# ----------------------------------------------------------------- import
def imported_config(size: str, patch: int, image_size: int):
  """The config.json of an imported encoder: what consumers build it from."""
  config = config_lib.base_config()
  config.model.size = size
  config.model.patch_size = patch
  config.model.image_size = image_size
  config.model.pos_embed = "learned"
  # A timm ViT has no per-block feature LayerNorms; "final" adds none.
  config.model.feature_norm = "final"
  config_checks.validate(config)
  return config


def import_checkpoint(source, out, image_size: int | None = None,
                      size: str | None = None) -> dict:
  """Writes a timm/MAE weights file as an Orbax encoder checkpoint in `out`; returns a summary.

  Args:
    source: `.safetensors`, `.pth`, `.pt` or `.bin` (timm names, MAE's {"model": ...}).
    out: a new directory: `out/checkpoints/0/...` and `out/config.json`.
    image_size: the resolution consumers run at; the position table is
      resampled (bicubic, class row kept) when its grid differs.
    size: the expected ViT size; None = read off the shapes.
  """
  if size is not None and size not in VIT_SIZES:
    raise ConvertError(f"--size={size!r}: allowed {tuple(VIT_SIZES)}")
  out = epath.Path(out)
  if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
    raise ConvertError(f"{out} already holds a checkpoint: choose a new --out")
  sd, notes = torch_vit.split_state_dict(read_state_dict(source))
  arch = torch_vit.infer_architecture(sd)
  size = size or _size_name(arch["width"], arch["depth"])
  width, depth, _ = VIT_SIZES[size]
  patch, grid = arch["patch_size"], arch["grid"] or (224 // arch["patch_size"],) * 2
  torch_vit.check_state_dict(
      sd, torch_vit.timm_shapes(width, depth, patch, grid[0] * grid[1]),
      f"ViT-{size}/{patch} ({width} wide, {depth} blocks) in timm's layout; {source} holds a "
      f"ViT {arch['width']} wide, {arch['depth']} blocks, patch {patch}")
  image_size = image_size or grid[0] * patch
  if image_size % patch:
    raise ConvertError(f"--image_size={image_size} is not a multiple of the patch size {patch}")
  new_grid = (image_size // patch,) * 2
  if new_grid != grid:
    notes.append(f"resampled pos_embed from a {grid[0]}x{grid[1]} to a "
                 f"{new_grid[0]}x{new_grid[1]} grid (bicubic, class row kept)")
  params = torch_vit.encoder_params_from_timm(sd, depth, new_grid)
  config = imported_config(size, patch, image_size)
  pretrained.check_encoder(params, _expected_encoder(config, image_size))
  pretrained.save_encoder(out, params, config, step=0)
  summary = {"source": str(source), "out": str(out), "size": size, "patch_size": patch,
             "image_size": image_size, "notes": notes}
  (out / "imported_from.json").write_text(json.dumps(summary, indent=2))
  return summary


# -------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m ddae_jax.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="a run's encoder -> timm/MAE state dict")
  ex.add_argument("--workdir", required=True,
                  help="pretraining or imported run directory (holds checkpoints/, config.json)")
  ex.add_argument("--out", required=True,
                  help="output file: .safetensors, or .pth/.pt (needs torch)")
  ex.add_argument("--ema", action="store_true",
                  help="export the momentum encoder theta' instead of the online encoder theta")
  ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ex.add_argument("--layout", default="timm", choices=torch_vit.LAYOUTS,
                  help="key naming: timm (final `norm`), mae_vit (MAE models_vit with "
                       "global_pool=True: `fc_norm`), mae_pretrain ({'model': timm keys}, "
                       "like mae_pretrain_vit_base.pth; .pth only), beit (BEiT-v2 students: "
                       "timm's beit_*_patch16_224). Default: timm")
  ex.add_argument("--num_classes", type=int, default=0,
                  help="0 (default): no classifier, load with num_classes=0; C > 0: add a "
                       "zero-initialised head.weight [C, D] and head.bias [C]")
  ex.add_argument("--image_size", type=int, default=None,
                  help="resolution of the exported pos_embed (default: the run's image size); "
                       "sin-cos tables are rebuilt exactly, learned ones resampled bicubically")
  im = sub.add_parser("import", help="a timm/MAE .pth/.safetensors -> Orbax encoder checkpoint")
  im.add_argument("--from", dest="source", required=True, metavar="PATH",
                  help="timm or MAE weights: .safetensors, .pth, .pt or .bin")
  im.add_argument("--out", required=True,
                  help="new directory for checkpoints/ and config.json (restored by "
                       "finetune, linear_probe, knn, analyze)")
  im.add_argument("--image_size", type=int, default=None,
                  help="resolution the model will run at (default: the checkpoint's grid x "
                       "patch); pos_embed is resampled bicubically when the grid differs")
  im.add_argument("--size", default=None, choices=tuple(VIT_SIZES),
                  help="expected ViT size; a file of another architecture fails listing the "
                       "mismatched names and shapes (default: read off the shapes)")
  return parser


def main(argv=None) -> dict:
  args = _parser().parse_args(argv)
  try:
    if args.command == "export":
      summary = export_checkpoint(args.workdir, args.out, "ema" if args.ema else "online",
                                  args.layout, args.num_classes, args.image_size, args.step)
    else:
      summary = import_checkpoint(args.source, args.out, args.image_size, args.size)
  except (ConvertError, CheckpointMissing, pretrained.CheckpointMismatch) as err:
    # A wrong file or setting, not a bug: the message is the whole story.
    raise SystemExit(f"error: {err}") from None
  print(json.dumps(summary, indent=2))
  return summary

