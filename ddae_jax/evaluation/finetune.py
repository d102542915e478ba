"""Fine-tunes a pretrained encoder end to end (the BEiT/MAE protocol of Appendix A).

The library of `python -m ddae_jax.finetune`; its usage and options: ddae_jax/finetune.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from ddae_jax import config_lib, optim, runtime, sharding
from ddae_jax.data.normalize import normalize_images
from ddae_jax.evaluation import classifier, input_pipeline, loop, mixup, scoring


def make_optimizer(config, params, steps: config_lib.Steps
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with BEiT's layer-wise decay, its lr schedule: warm-up to base_lr * batch / 256,
  then cosine to min_lr over `steps`)."""
  o = config.optim
  schedule = optim.lr_schedule(config, steps)
  depth = config_lib.encoder_dims(config)[1]
  return optim.adamw_layer_decay(schedule, params, depth, o.layer_decay, o.weight_decay,
                                      o.b1, o.b2, o.grad_clip_norm), schedule


def train_step(model, tx, schedule, config, state, batch):
  """One step on {"image": uint8[B, S, S, 3], "label": int32[B], "erase": int32[B, 4]}."""
  a = config.aug
  step = state["step"]
  k_erase, k_mix, k_drop = jax.random.split(jax.random.fold_in(state["rng"], step), 3)
  images = mixup.apply_erasing(k_erase, normalize_images(batch["image"]), batch["erase"])
  images, targets, _ = mixup.mix_batch(k_mix, images, batch["label"], config.model.num_classes,
                                       a.mixup, a.cutmix, a.mix_prob, a.switch_prob,
                                       a.label_smoothing)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, deterministic=False,
                         rngs={"dropout": k_drop})
    return optax.softmax_cross_entropy(logits, targets).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss": loss, "learning_rate": schedule(step),
                     "grad_norm": optax.tree.norm(grads)}


def eval_step(model, params, batch) -> dict:
  logits = model.apply({"params": params}, normalize_images(batch["image"]))
  return scoring.classification_sums(logits, batch["label"], batch["mask"])


def make_step(config, mesh, batch_spec, steps: config_lib.Steps | None = None) -> runtime.Built:
  """The classifier, its state's init function, shapes and shardings, and the jitted
  train step; nothing is placed on devices (ddae_jax/perf/aot.py compiles from this).
  steps: the run's step arithmetic (None: over config.num_train_images).

  Returns:
    runtime.Built without a state: model, tx, init_state(rng, encoder_params or
    None), abstract, shardings, step, batch_sharding.
  """
  # The mesh's platform, which is a TPU slice's when ddae_jax/perf/aot.py compiles for one.
  model = classifier.classifier_from_config(config, platform=mesh.devices.flat[0].platform)
  size = config.model.image_size
  init_params = lambda rng: model.init({"params": rng}, jnp.zeros((1, size, size, 3)))["params"]
  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, schedule = make_optimizer(config, abstract_params, steps or loop.resolve_steps(config))

  def init_state(rng, encoder_params):
    param_rng, step_rng = jax.random.split(rng)
    params = init_params(param_rng)
    if encoder_params is not None:
      params = dict(params, encoder=encoder_params)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "rng": step_rng}

  # A restored encoder has the shapes of a fresh one, so the layout is the same.
  _, shardings, abstract = runtime.sharded_state(
      init_state, mesh, config.sharding.rules, jax.random.PRNGKey(config.seed), None,
      materialize=False)
  step = jax.jit(functools.partial(train_step, model, tx, schedule, config),
                 in_shardings=(shardings, batch_spec),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return runtime.Built(mesh=mesh, state=None, shardings=shardings, step=step,
                       abstract=abstract, model=model, tx=tx, schedule=schedule,
                       init_state=init_state,
                       batch_sharding=batch_spec)


def build(config, devices=None, steps: config_lib.Steps | None = None):
  """Mesh, model, state (pretrained encoder inside), jitted train and eval steps.

  Returns:
    runtime.Built: make_step's, with the state and eval_step.
  """
  mesh, batch_spec = loop.setup(config, devices)
  parts = make_step(config, mesh, batch_spec, steps)
  model, shardings = parts.model, parts.shardings
  encoder = classifier.restore_encoder(config, parts.abstract["params"]["encoder"],
                                       config.model.image_size, config.model.patch_size)
  state, _, _ = runtime.sharded_state(parts.init_state, mesh, config.sharding.rules,
                                      jax.random.PRNGKey(config.seed), encoder)
  evaluate = jax.jit(functools.partial(eval_step, model),
                     in_shardings=(shardings["params"], batch_spec),
                     out_shardings=sharding.replicated(mesh))
  return dataclasses.replace(parts, state=state,
                             eval_step=lambda s, b: evaluate(s["params"], b))


def train_and_evaluate(config, workdir: str) -> dict:
  """Fine-tunes until config.epochs; returns the final validation top1, top5, loss, count."""
  return loop.run(config, workdir, build, input_pipeline.finetune_view)

