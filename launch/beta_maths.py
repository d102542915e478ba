r"""The maths behind README "Beta over training", measured on the quickstart (CPU only).

  JAX_PLATFORMS=cpu python launch/beta_maths.py                     # all three parts
  JAX_PLATFORMS=cpu python launch/beta_maths.py --parts=weights,distances  # seconds

Every number comes from the package's own code: the run is the one launch/beta_study.sh
starts (configs/quickstart.py, batch 32, 4 epochs, warm-up 0.5 epoch, beta's learning rate
x100, `weight_sum`), built by `train_step.build` and fed by the trainer's `TrainLoader`,
so its first batches and masks are those of that study's runs.

  gradients  beta's gradient at initialisation, split into the data's part (eq. 3 plus
             w_d times eq. 5) and eq. 6's regulariser, mean and spread over the first
             batches, at the four learnable inits of Table 7; then the first steps of the
             run (beta, both gradients, beta's learning rate, w_d), with and without the
             regulariser, and the farthest Adam can move beta in those steps.
  weights    eq. 2's max-rescaled weights (`dynamic_weights.loss_weights`) at the
             distances that occur, from beta = 0 down to the limit beta -> -inf, and how
             far eq. 2's distribution (`dynamic_weights.dynamic_weights`) has moved from
             uniform towards that limit on the quickstart's masks.
  distances  the distance of every masked patch to the nearest visible one
             (`dynamic_weights.distance_map`) over many masks (`masking.mask_from_config`):
             the quickstart's 8 x 8 grid with its masking, ViT-B's 14 x 14 with BootMAE's
             (the default) and with BEiT's generator for all 147 patches.
"""

from __future__ import annotations

import argparse
import os
import runpy
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddae_jax import config_checks, config_lib, sharding  # noqa: E402
from ddae_jax import train_step as ts  # noqa: E402
from ddae_jax.data import pipeline, sources  # noqa: E402
from ddae_jax.data.normalize import normalize_images  # noqa: E402
from ddae_jax.methods import schedules  # noqa: E402
from ddae_jax.objectives import dynamic_weights as dw  # noqa: E402
from ddae_jax.objectives.masking import mask_from_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INITS = ("beta_learn_m05", "beta_learn_0", "beta_learn_m01_m07", "beta_learn_m07_m01")
BETAS = (0.0, -0.5, -1.0, -2.0, -3.0, -4.0, -5.0)
# The squared distances of the masked patches the quickstart's grid holds most of.
SQUARED_DISTANCES = (1, 2, 4, 5, 8, 9, 10, 13, 16)
# (label, lowest, highest squared distance): the histogram's bins.
BINS = (("1", 1, 1), ("1.41", 2, 2), ("2", 4, 4), ("2.24", 5, 5), ("2.83", 8, 8),
        ("3..3.9", 9, 15), (">=4", 16, None))


def quickstart(arg: str = ""):
  return runpy.run_path(os.path.join(REPO, "configs/quickstart.py"))["get_config"](arg)


def study_config(init: str = "beta_learn_m05"):
  """launch/beta_study.sh's run: the quickstart at `init`, batch 32, 4 epochs, beta lr x100."""
  c = quickstart(init)
  c.dds.normalizer, c.epochs, c.optim.beta_lr_scale = "weight_sum", 4.0, 100.0
  c.batch_size, c.optim.warmup_epochs = 32, 0.5
  return c


# ------------------------------------------------------------------------------ distances
def masking_configs() -> dict:
  """{name: (grid, config.masking)} for the grids compared in the README."""
  quick, vitb, beit = quickstart(), config_lib.base_config(), config_lib.base_config()
  beit.masking.block_ratio, beit.masking.max_patches = 0.0, 0
  return {"quickstart 8x8": (config_lib.grid_size(quick), quick.masking),
          "ViT-B 14x14, BootMAE": (config_lib.grid_size(vitb), vitb.masking),
          "ViT-B 14x14, BEiT 147": (config_lib.grid_size(beit), beit.masking)}


def masks_and_distances(grid, masking, num_masks: int, seed: int = 0):
  """(bool[num_masks, N], float32[num_masks, N]): masks and their distance maps, as NumPy."""
  make = jax.jit(lambda key: mask_from_config(key, num_masks, grid, masking))
  mask = make(jax.random.PRNGKey(seed))
  return np.asarray(mask), np.asarray(jax.jit(dw.distance_map, static_argnums=1)(mask, grid))


def distance_stats(mask: np.ndarray, distance: np.ndarray) -> dict:
  """Mean distance of the masked patches, shares at >= 3 and >= 4, shares per BINS."""
  d = distance[mask]
  sq = np.round(d ** 2).astype(int)
  bins = {label: float(np.mean((sq >= lo) & (sq <= (sq.max() if hi is None else hi))))
          for label, lo, hi in BINS}
  return {"mean": float(d.mean()), "share_ge3": float(np.mean(d >= 3)),
          "share_ge4": float(np.mean(d >= 4)), "max": float(d.max()), "bins": bins}


def print_distances(num_masks: int):
  heads = " ".join(f"{label:>7}" for label, _, _ in BINS)
  print(f"\n(c) distance of a masked patch to the nearest visible one, {num_masks} masks each")
  print(f"{'grid, masking':24} {'mean':>5} {'>=3':>6} {'>=4':>6} {'max':>5}  share at D: {heads}")
  for name, (grid, masking) in masking_configs().items():
    s = distance_stats(*masks_and_distances(grid, masking, num_masks))
    shares = " ".join(f"{v:7.3f}" for v in s["bins"].values())
    print(f"{name:24} {s['mean']:5.2f} {s['share_ge3']:6.3f} {s['share_ge4']:6.3f} "
          f"{s['max']:5.2f}              {shares}")


# ------------------------------------------------------------------------------- weights
def weight_table(betas=BETAS, squared=SQUARED_DISTANCES) -> np.ndarray:
  """Eq. 2 rescaled by its max, float32[len(betas), len(squared)], on one image whose
  masked patches lie at sqrt(squared); for beta <= 0 the max is at distance 1, so the
  entries are exp(D^beta - 1), whose limit for beta -> -inf is 1 at D = 1, e^-1 elsewhere."""
  distance = jnp.sqrt(jnp.asarray(squared, jnp.float32))[None]
  mask = jnp.ones(distance.shape, bool)
  return np.asarray(dw.loss_weights(distance, mask, jnp.asarray(betas, jnp.float32)))[0]


def limit_progress(mask: np.ndarray, distance: np.ndarray, betas=BETAS) -> np.ndarray:
  """How far eq. 2's distribution has gone from uniform (beta = 0) to its beta -> -inf
  limit, 1 - TV(h_beta, h_lim) / TV(h_0, h_lim) averaged over the masks. -> float[len]."""
  h = np.asarray(dw.dynamic_weights(jnp.asarray(distance), jnp.asarray(mask),
                                    jnp.asarray((0.0,) + tuple(betas), jnp.float32)))
  lim = np.where(mask & (distance == 1.0), np.e, np.where(mask, 1.0, 0.0))
  lim = lim / lim.sum(-1, keepdims=True)
  tv = lambda a: 0.5 * np.abs(a - lim).sum(-1)
  return 1.0 - np.mean(np.stack([tv(h[:, k]) for k in range(1, h.shape[1])]) / tv(h[:, 0]),
                       axis=-1)


def print_weights(num_masks: int, finals=(-2.83, -4.30)):
  """finals: the highest and lowest final beta of README's `weight_sum` beta study."""
  table = weight_table()
  print("\n(b) eq. 2's weights rescaled by their max, exp(D^beta - 1) for beta <= 0")
  print(f"{'beta':>8}  " + " ".join(f"{'D=' + format(np.sqrt(s), '.3g'):>7}"
                                    for s in SQUARED_DISTANCES))
  for beta, row in zip(BETAS, table, strict=True):
    print(f"{beta:8.2f}  " + " ".join(f"{w:7.3f}" for w in row))
  limit = np.where(np.asarray(SQUARED_DISTANCES) == 1, 1.0, np.exp(-1.0))
  print(f"{'-inf':>8}  " + " ".join(f"{w:7.3f}" for w in limit))
  grid, masking = masking_configs()["quickstart 8x8"]
  mask, distance = masks_and_distances(grid, masking, num_masks)
  betas = BETAS[1:] + tuple(finals)
  progress = limit_progress(mask, distance, betas)
  print(f"share of the way from uniform to the limit (total variation), {num_masks} "
        "quickstart masks:")
  print("  " + ", ".join(f"beta {b:g}: {p:.2f}" for b, p in zip(betas, progress, strict=True)))


# ----------------------------------------------------------------------------- gradients
def beta_gradient_fn(model, config):
  """jit of (state, batch) -> float32[2, K]: d/d beta of the data's part of eq. 6 (eq. 3
  plus w_d eq. 5) and of its regulariser, with the step's own mask and targets."""
  @jax.jit
  def grads(state, batch):
    images = normalize_images(batch["image"])
    key = jax.random.fold_in(state["rng"], state["step"])
    mask = mask_from_config(key, images.shape[0], model.grid, config.masking)
    distance = dw.distance_map(mask, model.grid)
    extra = model.targets(state, dict(batch, input=images))

    def parts(beta):
      params = dict(state["params"], beta={"shared": beta})
      _, metrics = model.loss(params, images, mask, distance, **extra)
      reg = config.dds.reg_weight * metrics["beta_regularizer"]
      return jnp.stack([metrics["loss"] - reg, reg])

    return jax.jacrev(parts)(state["params"]["beta"]["shared"])
  return grads


def build_run(config):
  """(built, loader) of launch/beta_study.sh's run on one CPU device."""
  source = sources.make_source(config.data, config.model.image_size, config.seed,
                               config.batch_size, 0, 1)
  config_checks.validate(config, num_devices=1)
  derived = config_lib.resolve(config, num_images=source.num_examples)
  built = ts.build(config, jax.devices()[:1], derived=derived)
  loader = pipeline.TrainLoader(
      source, sharding.batch_sharding(built.mesh), config.batch_size,
      config.model.image_size, config.seed, scale=config.data.crop_scale,
      flip=config.data.flip, workers=1)
  return built, loader, source.num_examples


def with_beta(state, beta):
  return dict(state, params=dict(state["params"], beta={"shared": jnp.asarray(beta)}))


def init_gradients(num_batches: int) -> dict:
  """{init: float[num_batches, 2, K]}: beta's two gradients at initialisation, per batch."""
  c = study_config()
  built, loader, _ = build_run(c)
  batches = [next(loader) for _ in range(num_batches)]
  loader.close()
  grads = beta_gradient_fn(built.model, c)
  out = {}
  for init in INITS:
    state = with_beta(built.state, config_lib.beta_init(study_config(init)))
    out[init] = np.stack([np.asarray(grads(dict(state, step=jnp.int32(t)), b))
                          for t, b in enumerate(batches)])
  return out


def course(steps: int, reg_weight: float) -> list[dict]:
  """The first `steps` steps of the run (init -0.5): beta and its gradients before each."""
  c = study_config()
  c.dds.reg_weight = reg_weight
  built, loader, n = build_run(c)
  grads = beta_gradient_fn(built.model, c)
  schedule, steps_of_run = built.schedule, built.model.derived.steps
  state, rows = built.state, []
  for t in range(steps):
    batch = next(loader)
    g = np.asarray(grads(state, batch))
    rows.append({"step": t, "epoch": t * c.batch_size / n,
                 "beta": np.asarray(state["params"]["beta"]["shared"]), "data": g[0],
                 "reg": g[1], "beta_lr": float(schedule(t)) * c.optim.beta_lr_scale,
                 "w_d": float(schedules.distill_weight(c, jnp.asarray(t), steps_of_run))})
    state, _ = built.step(state, batch)
  loader.close()
  rows.append({"step": steps, "epoch": steps * c.batch_size / n,
               "beta": np.asarray(state["params"]["beta"]["shared"])})
  return rows


def fmt(v, scale=1.0):
  return " ".join(f"{x * scale:+6.2f}" for x in np.atleast_1d(v))


def print_gradients(num_batches: int, steps: int, every: int):
  print(f"(a) d loss / d beta at initialisation, x 1e3, blocks 1-4, over the first "
        f"{num_batches} batches (batch 32) of launch/beta_study.sh's run")
  print(f"{'init':19} {'data: mean':>27} {'data: std over batches':>27} "
        f"{'regulariser: mean':>27}")
  for init, g in init_gradients(num_batches).items():
    print(f"{init:19} {fmt(g[:, 0].mean(0), 1e3):>27} {fmt(g[:, 0].std(0), 1e3):>27} "
          f"{fmt(g[:, 1].mean(0), 1e3):>27}")
  for reg_weight in (0.5, 0.0):
    rows = course(steps, reg_weight)
    print(f"\nthe run's first {steps} steps from -0.5, regulariser weight {reg_weight}: beta at "
          f"the step, the gradients x 1e3 averaged over it and the next {every - 1}")
    print(f"{'step':>4} {'epoch':>5} {'beta lr':>7} {'w_d':>4} {'beta, blocks 1-4':>27} "
          f"{'data gradient':>27} {'regulariser gradient':>27}")
    for t in range(0, steps, every):
      r, window = rows[t], rows[t:min(t + every, steps)]
      data, reg = (np.mean([w[k] for w in window], 0) for k in ("data", "reg"))
      print(f"{t:4d} {r['epoch']:5.2f} {r['beta_lr']:7.4f} {r['w_d']:4.2f} {fmt(r['beta']):>27} "
            f"{fmt(data, 1e3):>27} {fmt(reg, 1e3):>27}")
    last = rows[-1]
    print(f"{last['step']:4d} {last['epoch']:5.2f} {'':12} {fmt(last['beta']):>27}")
    top = max(range(len(rows)), key=lambda i: rows[i]["beta"].mean())
    bound = sum(r["beta_lr"] for r in rows[:top])
    data, reg = (np.mean([r[k] for r in rows[:max(top, 1)]], 0) for k in ("data", "reg"))
    print(f"highest mean beta at step {top} (epoch {rows[top]['epoch']:.2f}): "
          f"{fmt(rows[top]['beta'])}; gradients x 1e3 averaged over the steps before it: "
          f"data {fmt(data, 1e3)}, regulariser {fmt(reg, 1e3)}; Adam moves beta by at most "
          f"its learning rate a step, {bound:.3f} in all before it ({bound / 100:.4f} at "
          "beta_lr_scale 1)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="gradients,weights,distances")
  parser.add_argument("--batches", type=int, default=16, help="batches at initialisation")
  parser.add_argument("--steps", type=int, default=40, help="steps of the run's course")
  parser.add_argument("--every", type=int, default=4, help="print every this many steps")
  parser.add_argument("--masks", type=int, default=2048, help="masks per grid")
  args = parser.parse_args()
  start = time.time()
  parts = args.parts.split(",")
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d')}")
  if "gradients" in parts:
    print_gradients(args.batches, args.steps, args.every)
  if "weights" in parts:
    print_weights(args.masks)
  if "distances" in parts:
    print_distances(args.masks)
  print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
