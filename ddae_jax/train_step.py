"""The train state and the one jitted, sharded pretraining step.

The state is a plain dict, every leaf placed on the mesh by the config's rules:
  step:        int32[]
  params:      the DDAE parameters (model.py), float32
  ema_params:  the momentum encoder theta' (absent when distillation is off)
  opt_state:   optax state (beta's Adam moments included)
  rng:         uint32[2], the run's key; step t uses fold_in(rng, t), so a
               resumed run sees exactly the masks it would have seen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ddae_jax import config_lib, optim, sharding
from ddae_jax.model import DDAE, normalize_images
from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import make_mask


def init_state(model: DDAE, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  param_rng, step_rng = jax.random.split(rng)
  params = model.init(param_rng)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params), "rng": step_rng}
  if model.distill_decoder is not None:
    state["ema_params"] = jax.tree.map(jnp.copy, params["encoder"])
  return state


def create_train_state(config, model: DDAE, tx, mesh):
  """Initialises the state directly on the devices, sharded by the rules.

  Returns:
    (state, shardings): the state and the NamedSharding tree that lays it out.
  """
  rng = jax.random.PRNGKey(config.seed)
  init = functools.partial(init_state, model, tx)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding.rules)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(model: DDAE, tx, batch_spec, state: dict, batch: dict):
  """One DDAE step: masks, momentum targets, K reconstructions, update, eq. 4.

  Args:
    state: the train state (module docstring).
    batch: {"image": uint8[B, H, W, 3]}, split over the mesh's batch axes.

  Returns:
    (new_state, metrics): metrics are float32 scalars.
  """
  c = model.config
  step = state["step"]
  images = jax.lax.with_sharding_constraint(normalize_images(batch["image"]), batch_spec)
  mask = make_mask(jax.random.fold_in(state["rng"], step), images.shape[0], model.grid,
                   c.masking.ratio, c.masking.kind)
  mask = jax.lax.with_sharding_constraint(mask, batch_spec)
  distance = distance_map(mask, model.grid)

  ema_out = None
  if "ema_params" in state:
    # The momentum encoder sees every patch; no gradient reaches it.
    ema_out = jax.lax.stop_gradient(model.encode(state["ema_params"], images))

  grad_fn = jax.value_and_grad(model.loss, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], images, mask, distance, ema_out)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)

  new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
  metrics = dict(metrics, learning_rate=optim.lr_schedule(c)(step),
                 grad_norm=_global_norm(grads), param_norm=_global_norm(params),
                 update_norm=_global_norm(updates))
  if "ema_params" in state:
    momentum = optim.ema_momentum(c, step)
    new_state["ema_params"] = optim.ema_update(state["ema_params"], params["encoder"],
                                               momentum)  # eq. 4
    metrics["ema_momentum"] = jnp.asarray(momentum, jnp.float32)
  for branch, beta in params.get("beta", {}).items():
    for i, g in enumerate(model.blocks):
      metrics[f"beta/{branch}/block_{g}"] = beta[i]
  return new_state, metrics


def make_train_step(model: DDAE, tx, mesh, state_shardings):
  """jax.jit of `train_step` with the state's and batch's shardings; donates the old state."""
  batch_spec = sharding.batch_sharding(mesh)
  step = functools.partial(train_step, model, tx, batch_spec)
  return jax.jit(step, in_shardings=(state_shardings, batch_spec),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def build(config, devices=None):
  """Validates the config, then makes the mesh, model, optimizer, state and step.

  Returns:
    dict with mesh, model, tx, state, shardings, step (the jitted train step).
  """
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding.make_mesh(config.sharding.mesh, devices)
  model = DDAE(config)
  tx = optim.make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(model, tx, mesh, shardings)
  return {"mesh": mesh, "model": model, "tx": tx, "state": state,
          "shardings": shardings, "step": step}
