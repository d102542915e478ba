"""The train state and the one jitted, sharded pretraining step.

The state is a plain dict, every leaf placed on the mesh by the config's rules:
  step:        int32[]
  params:      the DDAE (model.py) or BEiT-v2 (beitv2.py) parameters, float32
  ema_params:  the momentum encoder theta' (absent when distillation is off)
  tokenizer:   BEiT-v2's frozen VQ-KD tokenizer (method = "beitv2" only)
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
from ddae_jax.methods.beitv2 import BEiTv2, host_tokenizer_matches
from ddae_jax.methods.ddae import DDAE, normalize_images
from ddae_jax.models import attention
from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import mask_from_config


def make_model(config) -> DDAE | BEiTv2:
  """The model class of config.method."""
  return BEiTv2(config) if config.method == "beitv2" else DDAE(config)


def init_state(model: DDAE | BEiTv2, tx: optax.GradientTransformation,
               rng: jax.Array) -> dict:
  param_rng, step_rng = jax.random.split(rng)
  params = model.init(param_rng)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params), "rng": step_rng}
  if isinstance(model, BEiTv2):
    # Random here; build() puts the checkpoint's weights in their place.
    state["tokenizer"] = model.init_tokenizer(jax.random.fold_in(param_rng, 1))
  elif model.distill_decoder is not None:
    state["ema_params"] = jax.tree.map(jnp.copy, params["encoder"])
  return state


def state_layout(config, model: DDAE | BEiTv2, tx, mesh):
  """The state's init function, its shapes and its shardings; nothing is placed on devices.

  Returns:
    (init, abstract, shardings): init(rng) -> state; abstract is its
    ShapeDtypeStruct tree; shardings the NamedSharding tree of the rules.
  """
  init = functools.partial(init_state, model, tx)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  return init, abstract, sharding.state_shardings(abstract, mesh, config.sharding.rules)


def create_train_state(config, model: DDAE, tx, mesh, materialize: bool = True):
  """Initialises the state directly on the devices, sharded by the rules.

  Args:
    materialize: False computes only shapes and shardings (a run about to
      restore a checkpoint: a fresh state beside the restored one would double
      the device memory).

  Returns:
    (state or None, shardings, abstract): the state, the NamedSharding tree
    that lays it out, and ShapeDtypeStructs with those shardings.
  """
  init, shapes, shardings = state_layout(config, model, tx, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  rng = jax.random.PRNGKey(config.seed)
  state = jax.jit(init, out_shardings=shardings)(rng) if materialize else None
  return state, shardings, abstract


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(model: DDAE, tx, batch_spec, num_images, state: dict, batch: dict):
  """One DDAE step: masks, momentum targets, K reconstructions, update, eq. 4.

  Args:
    num_images: the train set's size, which the epoch-based schedules count
      (None: config.num_train_images).
    state: the train state (module docstring).
    batch: {"image": uint8[B, H, W, 3]}, split over the mesh's batch axes.

  Returns:
    (new_state, metrics): metrics are float32 scalars.
  """
  c = model.config
  step = state["step"]
  images = jax.lax.with_sharding_constraint(normalize_images(batch["image"]), batch_spec)
  mask = mask_from_config(jax.random.fold_in(state["rng"], step), images.shape[0], model.grid,
                          c.masking)
  mask = jax.lax.with_sharding_constraint(mask, batch_spec)
  distance = distance_map(mask, model.grid)

  targets, extra = None, {}
  if "ema_params" in state:
    # The momentum encoder sees every patch; no gradient reaches it.
    targets = jax.lax.stop_gradient(model.encode(state["ema_params"], images))
    extra["distill_weight"] = optim.distill_weight(c, step, num_images)
  if "tokenizer" in state:
    # BEiT-v2: the frozen tokenizer's codes of the un-normalised crop.
    targets = model.tokenize(state["tokenizer"], batch["image"])

  grad_fn = jax.value_and_grad(model.loss, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], images, mask, distance, targets, **extra)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)

  new_state = dict(state, step=step + 1, params=params, opt_state=opt_state)
  metrics = dict(metrics, learning_rate=optim.lr_schedule(c, num_images)(step),
                 grad_norm=_global_norm(grads), param_norm=_global_norm(params),
                 update_norm=_global_norm(updates))
  if "ema_params" in state:
    momentum = optim.ema_momentum(c, step, num_images)
    new_state["ema_params"] = optim.ema_update(state["ema_params"], params["encoder"],
                                               momentum)  # eq. 4
    metrics["ema_momentum"] = jnp.asarray(momentum, jnp.float32)
    metrics["distill_weight"] = extra["distill_weight"]
  for branch, beta in params.get("beta", {}).items():
    for i, g in enumerate(model.blocks):
      metrics[f"beta/{branch}/block_{g}"] = beta[i]
  return new_state, metrics


def make_train_step(model: DDAE, tx, mesh, state_shardings, num_images: int | None = None):
  """jax.jit of `train_step` with the state's and batch's shardings; donates the old state."""
  batch_spec = sharding.batch_sharding(mesh)

  def step(state, batch):
    with attention.kernel_mesh(mesh, sharding.BATCH_AXES):
      return train_step(model, tx, batch_spec, num_images, state, batch)

  return jax.jit(step, in_shardings=(state_shardings, batch_spec),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def setup(config, devices, num_train_images: int | None = None) -> tuple:
  """Validates the config, then makes the mesh, model and optimizer (no compute).

  `devices` may be compile-only devices of a TPU topology (ddae_jax/aot.py).

  Returns:
    (mesh, model, tx).
  """
  config_lib.validate(config, num_devices=len(devices))
  return (sharding.make_mesh(config.sharding.mesh, devices), make_model(config),
          optim.make_optimizer(config, num_train_images))


def build(config, devices=None, materialize: bool = True, num_train_images: int | None = None):
  """Validates the config, then makes the mesh, model, optimizer, state and step.

  Args:
    materialize: False leaves "state" None (and the tokenizer file unread):
      the caller restores a checkpoint into "abstract" instead.
    num_train_images: the train set's size, which epochs count (None:
      config.num_train_images).

  Returns:
    dict with mesh, model, tx, state, shardings, abstract (the state's
    ShapeDtypeStructs with shardings), step (the jitted train step).
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh, model, tx = setup(config, devices, num_train_images)
  loaded = None
  if materialize and config.method == "beitv2" and not config.tokenizer.random_weights:
    loaded = model.load_tokenizer()  # read and checked before any compute
  state, shardings, abstract = create_train_state(config, model, tx, mesh, materialize)
  if loaded is not None:
    host_tokenizer_matches(loaded, state["tokenizer"])
    state["tokenizer"] = jax.device_put(loaded, shardings["tokenizer"])
  step = make_train_step(model, tx, mesh, shardings, num_train_images)
  return {"mesh": mesh, "model": model, "tx": tx, "state": state,
          "shardings": shardings, "abstract": abstract, "step": step}
