r"""How much of eq. 6's gradient reaches the class token of a DDAE (or MAE-row) encoder (CPU).

  JAX_PLATFORMS=cpu python launch/cls_gradient.py                       # quickstart at init
  JAX_PLATFORMS=cpu python launch/cls_gradient.py --workdir=/tmp/ddae_quickstart  # a run

No loss of DDAE looks at the class token: eq. 3 and eq. 5 score the masked patches, the
distillation targets drop the class token, and the decoders drop it before their heads.
Its only gradient is what the decoders' self-attention sends back to it, and what the
encoder's later blocks send back through their attention. This measures that gradient on
the run's first batches, with its own masks and momentum targets: the loss is
differentiated w.r.t. the input of the encoder's first block (the embeddings) and the
output of every block, through flax's method interception (the model is unchanged).
For each, the gradient's norm at the class-token position is set against the mean norm
at a visible patch's position, image by image, for eq. 3 (pixels) and w_d x eq. 5
(distillation) apart; the `cls_token` parameter's gradient is the first row's class
column summed over the batch.

Without --workdir the state is the run's initialisation (config.seed); with it, the
latest checkpoint of that pretraining workdir and the config it saved.
"""

from __future__ import annotations

import argparse
import os
import runpy
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddae_jax import config_lib, methods, optim  # noqa: E402
from ddae_jax import train_step as ts  # noqa: E402
from ddae_jax.data import pipeline, sources  # noqa: E402
from ddae_jax.data.normalize import normalize_images  # noqa: E402
from ddae_jax.methods import schedules  # noqa: E402
from ddae_jax.models.vit import Block, ViTEncoder  # noqa: E402
from ddae_jax.objectives.dynamic_weights import distance_map  # noqa: E402
from ddae_jax.objectives.masking import mask_from_config  # noqa: E402
from ddae_jax.weights import pretrained  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_encoder(probes, seen: list):
  """An interceptor that adds probes to the online encoder's activations (the decoders'
  blocks are left alone), so d loss / d probes is the gradient there; `seen` collects the
  activations probed.

  probes: (float32[depth + 1, B, T, D]: the first block's input, then every block's
    output; float32[B, K, T, D]: the features f^(g_i) the decoders read).
  """
  residual, features = probes

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, ViTEncoder):
      out = next_fun(*args, **kwargs)
      return dict(out, features=out["features"] + features)
    if not (isinstance(module, Block) and isinstance(module.parent, ViTEncoder)):
      return next_fun(*args, **kwargs)
    i = int(module.name.split("_")[-1])
    x = args[0]
    if i == 0:
      x = x + residual[0]
      seen.append(x)
    out = next_fun(x, *args[1:], **kwargs) + residual[i + 1]
    seen.append(out)
    return out
  return intercept


def activation_gradient_fn(model, config):
  """jit of (state, batch) -> ((residual, features), activations): d eq. 3 and d (w_d eq. 5)
  w.r.t. the probes of `probe_encoder`, float32[2, *probe shape] each, and the residual
  activations float32[depth + 1, B, T, D], with the step's own mask and targets."""
  depth, width, k = model.encoder.depth, model.encoder.width, len(model.blocks)

  @jax.jit
  def grads(state, batch):
    images = normalize_images(batch["image"])
    key = jax.random.fold_in(state["rng"], state["step"])
    mask = mask_from_config(key, images.shape[0], model.grid, config.masking)
    distance = distance_map(mask, model.grid)
    extra = model.targets(state, dict(batch, input=images))
    weight = extra.get("distill_weight", jnp.ones((), jnp.float32))

    def parts(probes):
      seen = []
      with nn.intercept_methods(probe_encoder(probes, seen)):
        _, metrics = model.loss(state["params"], images, mask, distance, **extra)
      return jnp.stack([metrics["pixel_loss"], weight * metrics["distill_loss"]]), jnp.stack(seen)

    tokens = (images.shape[0], 1 + model.num_visible(), width)
    probes = (jnp.zeros((depth + 1,) + tokens), jnp.zeros((tokens[0], k) + tokens[1:]))
    return jax.jacrev(parts, has_aux=True)(probes)
  return grads


def load(workdir: str | None, config_arg: str):
  """(config, model, state, source): a run's latest checkpoint, or a config's initial state."""
  if workdir:
    config = pretrained.load_config(workdir)
    state, _ = pretrained.restore_state(workdir)
  else:
    path, _, arg = config_arg.partition(":")
    config = runpy.run_path(os.path.join(REPO, path))["get_config"](arg)
    state = None
  source = sources.make_source(config.data, config.model.image_size, config.seed,
                               config.batch_size, 0, 1)
  model = methods.make(config, config_lib.resolve(config, num_images=source.num_examples))
  if state is None:
    tx = optim.make_optimizer(config, optim.lr_schedule(config, model.derived.steps))
    state = ts.init_state(model, tx, jax.random.PRNGKey(config.seed))
  state = jax.tree.map(jnp.asarray, state)
  return config, model, state, source


def _cls_and_patch(x: np.ndarray):
  """[..., B, T] -> ([...] at the class token, [...] over the visible patches), image means."""
  return x[..., 0].mean(-1), x[..., 1:].mean((-1, -2))


def measure(workdir: str | None, config_arg: str, num_batches: int) -> dict:
  """Mean per-token gradient norms at the class token ("cls") and a visible patch ("patch"),
  per loss part [2, ...]: at the features f^(g_i) ("feat_*", [2, K]), at the residual stream
  ("res_*", [2, depth + 1]) and that times the token's standard deviation over channels
  ("scaled_*"; the residual stream is read through LayerNorms, whose Jacobian is 1 / std);
  the stds ("std_*", [depth + 1]); the cls_token parameter's gradient norm ([2])."""
  config, model, state, source = load(workdir, config_arg)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loader = pipeline.TrainLoader(source, cpu, config.batch_size, config.model.image_size,
                                config.seed, scale=config.data.crop_scale,
                                flip=config.data.flip, workers=1)
  grads = activation_gradient_fn(model, config)
  out = []
  for _ in range(num_batches):
    (g_res, g_feat), acts = jax.tree.map(np.asarray, grads(state, next(loader)))
    n_res = np.linalg.norm(g_res, axis=-1)                       # [2, L, B, T]
    n_feat = np.linalg.norm(np.moveaxis(g_feat, 2, 1), axis=-1)  # [2, K, B, T]
    std = acts.std(-1)                                           # [L, B, T]
    row = {}
    for name, x in (("feat", n_feat), ("res", n_res), ("scaled", n_res * std), ("std", std)):
      row[f"{name}_cls"], row[f"{name}_patch"] = _cls_and_patch(x)
    row["cls_token"] = np.linalg.norm(g_res[:, 0, :, 0].sum(1), axis=-1)
    out.append(row)
  loader.close()
  result = {k: np.mean([r[k] for r in out], 0) for k in out[0]}
  w_d = schedules.distill_weight(config, state["step"], model.derived.steps)
  result.update(step=int(state["step"]), w_d=float(w_d) if config.distill.enabled else 0.0,
                blocks=model.blocks)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="", help="a pretraining workdir (default: init)")
  parser.add_argument("--config", default="configs/quickstart.py",
                      help="config[:variants] for the initial state (without --workdir)")
  parser.add_argument("--batches", type=int, default=4)
  args = parser.parse_args()
  start = time.time()
  r = measure(args.workdir or None, args.config, args.batches)
  print(f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}, "
        f"{args.workdir or args.config} at step {r['step']}, {args.batches} batches, "
        f"w_d {r['w_d']:.2f}")
  parts = ("eq. 3 (pixels)", "w_d x eq. 5 (distill)")
  print("\nd loss / d features f^(g_i) the decoders read, per token: class token, mean visible"
        " patch, ratio")
  print(f"{'':18} {parts[0]:>30} {parts[1]:>30}")
  for i, g in enumerate(r["blocks"]):
    cells = [f"{r['feat_cls'][p, i]:9.2e} {r['feat_patch'][p, i]:9.2e} "
             f"{r['feat_cls'][p, i] / max(r['feat_patch'][p, i], 1e-30):9.3f}" for p in (0, 1)]
    print(f"{'f^(' + str(g) + ')':18} {cells[0]:>30} {cells[1]:>30}")
  print("\nresidual stream: gradient ratio class / patch, token std (class, patch), and the"
        " ratio of gradient x std")
  print(f"{'':18} {'grad ratio':>21} {'std: class':>10} {'patch':>7} {'grad x std ratio':>21}")
  for layer in range(r["res_cls"].shape[1]):
    name = "embeddings" if layer == 0 else f"block {layer} output"
    ratio = " ".join(f"{r['res_cls'][p, layer] / max(r['res_patch'][p, layer], 1e-30):10.3f}"
                     for p in (0, 1))
    scaled = " ".join(
        f"{r['scaled_cls'][p, layer] / max(r['scaled_patch'][p, layer], 1e-30):10.3f}"
        for p in (0, 1))
    print(f"{name:18} {ratio:>21} {r['std_cls'][layer]:10.3f} {r['std_patch'][layer]:7.3f} "
          f"{scaled:>21}")
  print(f"cls_token parameter gradient norm: eq. 3 {r['cls_token'][0]:.2e}, "
        f"w_d x eq. 5 {r['cls_token'][1]:.2e}")
  print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
