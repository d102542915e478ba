"""Linear probing of a frozen pretrained encoder (MAE's protocol, Appendix A).

The library of `python -m ddae_jax.linear_probe`; its usage and options: ddae_jax/linear_probe.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ddae_jax import config_lib, optim, runtime, sharding
from ddae_jax.data.normalize import normalize_images
from ddae_jax.evaluation import classifier, input_pipeline, loop, scoring


def train_step(encoder, head, tx, schedule, pooling, encoder_params, state, batch):
  """One LARS step of the head on frozen features of {"image", "label"}."""
  features = classifier.frozen_features(encoder, encoder_params,
                                        normalize_images(batch["image"]), pooling)

  def loss_fn(params):
    logits, updates = head.apply({"params": params, "batch_stats": state["batch_stats"]},
                                 features, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = dict(state, step=state["step"] + 1, opt_state=opt_state,
                   params=optax.apply_updates(state["params"], updates),
                   batch_stats=batch_stats)
  return new_state, {"loss": loss, "learning_rate": schedule(state["step"]),
                     "grad_norm": optax.tree.norm(grads)}


def eval_step(encoder, head, pooling, encoder_params, state, batch) -> dict:
  features = classifier.frozen_features(encoder, encoder_params,
                                        normalize_images(batch["image"]), pooling)
  logits = head.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                      features, train=False)
  return scoring.classification_sums(logits, batch["label"], batch["mask"])


def build(config, devices=None, steps: config_lib.Steps | None = None):
  """Mesh, frozen encoder, head state, jitted train and eval steps; steps: the run's step
  arithmetic (None: over config.num_train_images)."""
  mesh, batch_spec = loop.setup(config, devices)
  block, pooling = classifier.frozen_readout(config)
  encoder = classifier.frozen_encoder(config, block)
  encoder_params = classifier.frozen_encoder_params(config, encoder, mesh)
  head = classifier.ProbeHead(config.model.num_classes)
  width = encoder.width
  o = config.optim
  schedule = optim.lr_schedule(config, steps or loop.resolve_steps(config))
  tx = optim.lars(schedule, o.momentum, o.weight_decay, o.trust_coefficient)

  def init_state(rng):
    variables = head.init(rng, jnp.zeros((2, width)), train=False)
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}

  state, shardings, _ = runtime.sharded_state(init_state, mesh, config.sharding.rules,
                                              jax.random.PRNGKey(config.seed))
  # The encoder goes in as an argument: closed over, jit would embed it as a constant.
  step = jax.jit(functools.partial(train_step, encoder, head, tx, schedule, pooling),
                 in_shardings=(sharding.replicated(mesh), shardings, batch_spec),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=1)
  evaluate = jax.jit(functools.partial(eval_step, encoder, head, pooling),
                     out_shardings=sharding.replicated(mesh))
  return runtime.Built(mesh=mesh, state=state, shardings=shardings,
                       step=lambda s, b: step(encoder_params, s, b),
                       eval_step=lambda s, b: evaluate(encoder_params, s, b),
                       model=head, tx=tx, schedule=schedule, batch_sharding=batch_spec)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains the probe until config.epochs; returns the final validation metrics."""
  return loop.run(config, workdir, build, input_pipeline.probe_view)

