"""The paper's figures from your own runs: PNGs plus the numbers behind them (JSON).

The library of `python -m ddae_jax.analyze`; its usage and options: ddae_jax/analyze.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import time

import numpy as np


# ------------------------------------------------------------------ loading runs
def load_run_config(workdir: str, config_path: str | None):
  """The config saved in `workdir`, else the one at `config_path` (.py[:variants] or .json)."""
  from ddae_jax.weights import pretrained
  config = pretrained.load_config(workdir)
  if config is not None:
    return config
  if not config_path:
    raise SystemExit(f"{workdir} has no config.json: pass the run's config with --config "
                     "(e.g. --config=configs/quickstart.py)")
  import ml_collections
  path, _, arg = config_path.partition(":")
  if path.endswith(".json"):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  spec = importlib.util.spec_from_file_location("analysis_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_images(config, split: str | None, num: int, size: int,
                files: list[str] | None = None) -> np.ndarray:
  """uint8[num, size, size, 3]: the given image files, else the first records of the config's data.

  The records come from the run's own data source (digits, synthetic, TFDS,
  image folder) in its fixed order, each as a centre crop of its shorter side
  resized to `size` (no zoom, so the whole object stays in view).
  """
  from ddae_jax.data import augment, sources
  if files:
    raws = [pathlib.Path(f).read_bytes() for f in files[:num]]
  else:
    source = sources.make_source(config.data, size, config.seed, 1, 0, 1, split)
    records = source.records(0)
    raws = [next(records)[2] for _ in range(num)]
  return np.stack([augment.center_view(r, size, resize=size) for r in raws])


def _labels(args) -> list[str]:
  labels = args.label or [os.path.basename(os.path.normpath(w)) for w in args.workdir]
  if len(labels) != len(args.workdir):
    raise SystemExit(f"{len(args.label)} --label for {len(args.workdir)} --workdir")
  return labels


def _write_json(out: str, name: str, data: dict) -> str:
  path = os.path.join(out, f"{name}.json")
  with open(path, "w") as f:
    # One line per top-level key: readable keys, arrays kept compact.
    f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items())
            + "\n}\n")
  return path


def _rounded(x, digits=5):
  return np.round(np.asarray(x, np.float64), digits).tolist()


# --------------------------------------------------------------------- commands
def cmd_reconstruct(args) -> dict:
  import jax

  from ddae_jax import config_lib
  from ddae_jax.analysis import plots, reconstruction
  from ddae_jax.methods.ddae import DDAE
  from ddae_jax.objectives.masking import mask_from_config
  from ddae_jax.weights import pretrained
  config = load_run_config(args.workdir[0], args.config)
  if args.mask_ratio is not None:
    config.masking.ratio = args.mask_ratio
  if args.masking:
    config.masking.kind = args.masking
  config.model.dtype = "float32"
  model = DDAE(config, config_lib.resolve(config))
  state, step = pretrained.restore_state(args.workdir[0], args.step)
  images = load_images(config, args.split, args.num_images, config.model.image_size,
                       args.image_files)
  mask = mask_from_config(jax.random.key(args.seed), len(images), model.grid, config.masking)
  data = reconstruction.reconstruct(model, state["params"], images, np.asarray(mask))
  plots.reconstructions(data, model.blocks, os.path.join(args.out, "reconstruct.png"))
  beta = {k: _rounded(v) for k, v in state["params"].get("beta", {}).items()}
  return {"workdir": args.workdir[0], "step": step, "blocks": list(model.blocks),
          "mask_ratio": config.masking.ratio, "masking": config.masking.kind, "beta": beta,
          "norm_pix": bool(config.pixel.norm_pix),
          "masked_error": _rounded(data["masked_error"]), "mask": np.asarray(mask).tolist(),
          "distance": _rounded(data["distance"]), "weights": _rounded(data["weights"])}


def cmd_distance_maps(args) -> dict:
  from ddae_jax.analysis import distance, plots
  ratios = [float(r) for r in args.ratios.split(",")]
  kinds = args.kinds.split(",")
  panels = distance.distance_map_panels((args.grid, args.grid), ratios, kinds, args.seed)
  plots.distance_maps(panels, os.path.join(args.out, "distance-maps.png"))
  return {"grid": args.grid, "seed": args.seed,
          "panels": [{"kind": p["kind"], "ratio": p["ratio"], "mask": p["mask"].tolist(),
                      "distance": _rounded(p["distance"]),
                      "normalized": _rounded(p["normalized"])} for p in panels]}


def cmd_beta(args) -> dict:
  from ddae_jax.analysis import beta, plots
  runs = {}
  for label, workdir in zip(_labels(args), args.workdir, strict=True):
    curves = beta.beta_curves(beta.read_metrics(workdir))
    if not curves:
      raise SystemExit(f"{workdir}/metrics.jsonl has no beta/* metrics (a run with "
                       "dds.dynamic=False has no beta)")
    runs[label] = curves
  if args.x == "epoch" and any(None in c["epoch"] for r in runs.values() for c in r.values()):
    raise SystemExit("some rows have no 'epoch' metric: use --x=step")
  plots.beta_curves(runs, os.path.join(args.out, "beta.png"), x=args.x)
  summary = {label: {k: beta.curve_summary(c, args.x) for k, c in curves.items()}
             for label, curves in runs.items()}
  return {"runs": runs, "summary": summary}


def cmd_evals(args) -> dict:
  from ddae_jax.analysis import evals, plots
  groups = evals.read_groups(args.workdir, _labels(args), args.metric)
  if args.x == "epoch" and any(None in g["epoch"] for g in groups.values()):
    raise SystemExit("some evaluated steps have no 'epoch' metric: use --x=step")
  plots.metric_over_training(groups, os.path.join(args.out, "evals.png"), args.metric, args.x)
  summary = {label: {"final_mean": g["mean"][-1], "final_std": g["std"][-1],
                     "final_min": g["min"][-1], "final_max": g["max"][-1],
                     "runs": len(g["runs"])} for label, g in groups.items()}
  return {"metric": args.metric, "groups": groups, "summary": summary}


def _attention(args, block: int | None) -> tuple[dict, np.ndarray | None]:
  """Runs every checkpoint's encoder on the same images: {label: summary}, display images."""
  import jax.numpy as jnp

  from ddae_jax.analysis import attention
  from ddae_jax.analysis.reconstruction import to_display
  from ddae_jax.data.normalize import normalize_images
  from ddae_jax.weights import pretrained
  results, shown = {}, None
  for label, workdir in zip(_labels(args), args.workdir, strict=True):
    config = load_run_config(workdir, args.config)
    state, step = pretrained.restore_state(workdir, args.step)
    params = pretrained.encoder_from_state(state, args.encoder)
    size = config.model.image_size
    images = load_images(config, args.split, args.num_images, size, args.image_files)
    x = normalize_images(jnp.asarray(images))
    start = time.perf_counter()
    summary = attention.attention_summary(attention.analysis_encoder(config, params), params, x,
                                          map_block=block, batch=args.batch)
    summary.update(seconds=time.perf_counter() - start, step=step, workdir=workdir,
                   patch_size=config.model.patch_size, image_size=size)
    results[label] = summary
    shown = to_display(x) if shown is None else shown
  return results, shown


def cmd_attention_maps(args) -> dict:
  from ddae_jax.analysis import plots
  results, shown = _attention(args, args.block)
  patch = {r["patch_size"] for r in results.values()}
  if len(patch) > 1 or len({r["image_size"] for r in results.values()}) > 1:
    raise SystemExit("attention-maps compares checkpoints with the same image and patch size")
  plots.attention_maps(shown, {k: r["maps"] for k, r in results.items()}, patch.pop(),
                       args.block, os.path.join(args.out, "attention-maps.png"))
  return {"block": args.block, "encoder": args.encoder, "checkpoints": {
      k: {"workdir": r["workdir"], "step": r["step"], "seconds": round(r["seconds"], 2),
          "maps": _rounded(r["maps"], 6)} for k, r in results.items()}}


def cmd_attention_distance(args) -> dict:
  from ddae_jax.analysis import plots
  from ddae_jax.analysis.attention import patch_pixel_distances
  results, _ = _attention(args, None)
  uniform = {}
  for k, r in results.items():
    side = r["image_size"] // r["patch_size"]
    uniform[k] = float(patch_pixel_distances((side, side), r["patch_size"]).mean())
  plots.attention_distance({k: r["distance"] for k, r in results.items()},
                           os.path.join(args.out, "attention-distance.png"), uniform)
  return {"encoder": args.encoder, "unit": "pixels", "class_token": "excluded",
          "checkpoints": {k: {"workdir": r["workdir"], "step": r["step"],
                              "seconds": round(r["seconds"], 2),
                              "uniform_attention_distance": round(uniform[k], 3),
                              "distance": _rounded(r["distance"], 3),
                              "class_token_mass": _rounded(r["class_token_mass"], 4)}
                          for k, r in results.items()}}


COMMANDS = {"reconstruct": cmd_reconstruct, "distance-maps": cmd_distance_maps,
            "beta": cmd_beta, "evals": cmd_evals, "attention-maps": cmd_attention_maps,
            "attention-distance": cmd_attention_distance}


# ------------------------------------------------------------------------ flags
def _run_args(p, max_runs: int):
  p.add_argument("--workdir", action="append", required=True,
                 help=f"a pretraining workdir (repeat for up to {max_runs}, side by side)")
  p.add_argument("--label", action="append", help="a name per --workdir (default: its folder)")
  p.add_argument("--config", help="config for runs without config.json: a .py file "
                 "(optionally :variants) or a config.json")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")


def _image_args(p, num: int):
  p.add_argument("--split", help="data split to take images from (default: the config's; "
                 "digits: train or test)")
  p.add_argument("--num_images", type=int, default=num, help="how many images")
  p.add_argument("--image_files", nargs="+", help="your own image files instead of the "
                 "config's data")


def parser() -> argparse.ArgumentParser:
  top = argparse.ArgumentParser(prog="python -m ddae_jax.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = top.add_subparsers(dest="command", required=True, metavar="command")

  def add(name, help_, max_runs=None):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--out", default=".", help="output directory (created if missing)")
    p.set_defaults(max_runs=max_runs or 0)
    if max_runs:
      _run_args(p, max_runs)
    return p

  p = add("reconstruct", "Original, masked input, distance map, the loss weights of every "
          "supervised block and the reconstruction decoded from every supervised block "
          "(online encoder + pixel decoder; denormalised with each target patch's own "
          "mean/std when the run used norm_pix).", 1)
  _image_args(p, 4)
  p.add_argument("--mask_ratio", type=float, help="default: the run's")
  p.add_argument("--masking", choices=("blockwise", "random"), help="default: the run's")
  p.add_argument("--seed", type=int, default=0, help="mask seed")

  p = add("distance-maps", "Fig. 2: masks and their distance maps (normalised to [0, 1], "
          "darker = farther from visible patches) per masking ratio and kind.")
  p.add_argument("--grid", type=int, default=14, help="patch grid side (ViT-B/16 at 224: 14)")
  p.add_argument("--ratios", default="0.5,0.75,0.9", help="comma-separated mask ratios")
  p.add_argument("--kinds", default="blockwise,random", help="comma-separated masking kinds")
  p.add_argument("--seed", type=int, default=0, help="mask seed")

  p = add("beta", "Fig. 5/6: every beta over training, from each run's metrics.jsonl; "
          "several --workdir are overlaid (colour = block, line style = run).", 8)
  p.add_argument("--x", choices=("step", "epoch"), default="step", help="x-axis")

  p = add("evals", "An evaluator's metric over training (config.evals, e.g. knn/top1), "
          "from each run's metrics.jsonl; runs with the same --label are one group (its "
          "seeds): mean, min-max band and each run.", 32)
  p.add_argument("--metric", default="knn/top1", help="the metrics.jsonl key")
  p.add_argument("--x", choices=("step", "epoch"), default="epoch", help="x-axis")

  for name, text in (("attention-maps", "Fig. 3/7: class-token to patch attention, mean "
                      "over heads, at one block, overlaid on the images; one row per "
                      "checkpoint."),
                     ("attention-distance", "Fig. 4: mean attention distance (pixels) of "
                      "every head in every block, patch tokens only (the class token is "
                      "excluded as query and key, key weights renormalised), averaged "
                      "over query patches and images; one panel per checkpoint.")):
    p = add(name, text, 2)
    _image_args(p, 8)
    p.add_argument("--encoder", choices=("online", "ema"), default="online",
                   help="which encoder of the run (MAE-style runs have only 'online')")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    if name == "attention-maps":
      p.add_argument("--block", type=int, default=3, help="1-based block (paper: 3)")
  return top


def main(argv=None) -> dict:
  """Runs one command; returns what it wrote to <out>/<command>.json."""
  args = parser().parse_args(argv)
  if len(getattr(args, "workdir", None) or []) > args.max_runs:
    raise SystemExit(f"{args.command} takes at most {args.max_runs} --workdir")
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  result = COMMANDS[args.command](args)
  result["seconds_total"] = round(time.perf_counter() - start, 2)
  path = _write_json(args.out, args.command, result)
  print(f"wrote {os.path.join(args.out, args.command + '.png')} and {path} "
        f"({result['seconds_total']} s)")
  return result

