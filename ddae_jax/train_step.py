"""The train state and the one jitted, sharded pretraining step.

The state is a plain dict, every leaf placed on the mesh by the config's rules:
  step:        int32[]
  params:      the method's trained parameters (methods/ddae.py, methods/beitv2.py), float32
  opt_state:   optax state (beta's Adam moments included)
  rng:         uint32[2], the run's key; step t uses fold_in(rng, t), so a
               resumed run sees exactly the masks it would have seen.
and the method's own entries (Method.init_state), which no optimizer touches:
  ema_params:  DDAE's momentum encoder theta' (absent when distillation is off)
  tokenizer:   BEiT-v2's frozen VQ-KD tokenizer
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ddae_jax import config_checks, config_lib, methods, optim, runtime, sharding
from ddae_jax.data.normalize import normalize_images
from ddae_jax.methods import Method
from ddae_jax.models import attention
from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import mask_from_config


def init_state(model: Method, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  param_rng, step_rng = jax.random.split(rng)
  params = model.init(param_rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params), "rng": step_rng, **model.init_state(params, param_rng)}


def create_train_state(config, model: Method, tx, mesh, materialize: bool = True):
  """Initialises the state directly on the devices, sharded by the rules.

  Args:
    materialize: False computes only shapes and shardings (a run about to
      restore a checkpoint: a fresh state beside the restored one would double
      the device memory).

  Returns:
    (state or None, shardings, abstract): the state, the NamedSharding tree
    that lays it out, and ShapeDtypeStructs with those shardings.
  """
  init = functools.partial(init_state, model, tx)
  return runtime.sharded_state(init, mesh, config.sharding.rules,
                               jax.random.PRNGKey(config.seed), materialize=materialize)


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def train_step(model: Method, tx, schedule, batch_spec, state: dict, batch: dict):
  """One pretraining step: masks, the method's targets, its loss (eq. 6), update, eq. 4.

  Args:
    schedule: the optimizer's learning-rate schedule (reported as a metric).
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

  from_state = model.targets(state, dict(batch, input=images))
  grad_fn = jax.value_and_grad(model.loss, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], images, mask, distance, **from_state)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)

  own_state, own_metrics = model.after_update(state, params)  # eq. 4 for DDAE
  new_state = dict(state, step=step + 1, params=params, opt_state=opt_state, **own_state)
  metrics = dict(metrics, learning_rate=schedule(step),
                 grad_norm=_global_norm(grads), param_norm=_global_norm(params),
                 update_norm=_global_norm(updates), **own_metrics)
  for branch, beta in params.get("beta", {}).items():
    for i, g in enumerate(model.blocks):
      metrics[f"beta/{branch}/block_{g}"] = beta[i]
  return new_state, metrics


def make_train_step(model: Method, tx, schedule, mesh, state_shardings):
  """jax.jit of `train_step` with the state's and batch's shardings; donates the old state."""
  batch_spec = sharding.batch_sharding(mesh)

  def step(state, batch):
    with attention.kernel_mesh(mesh, sharding.BATCH_AXES):
      return train_step(model, tx, schedule, batch_spec, state, batch)

  return jax.jit(step, in_shardings=(state_shardings, batch_spec),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def build(config, devices=None, materialize: bool = True,
          derived: config_lib.Derived | None = None):
  """Makes the mesh, model, optimizer, state and step of a pretraining config.

  Args:
    devices: the mesh's devices (default jax.devices()); compile-only devices of a
      TPU topology for ddae_jax/perf/aot.py.
    materialize: False leaves "state" None (and the tokenizer file unread):
      the caller restores a checkpoint into "abstract", or only compiles.
    derived: the run's resolved values (config_lib.resolve: its platform and its
      steps over the dataset), from an entry point that validated the config; None
      validates and resolves here, for `devices`' platform and config.num_train_images.

  Returns:
    runtime.Built with mesh, model, tx, schedule, state, shardings, abstract, step.
  """
  devices = list(jax.devices() if devices is None else devices)
  if derived is None:
    config_checks.validate(config, num_devices=len(devices))
    derived = config_lib.resolve(config, devices[0].platform)
  mesh = sharding.make_mesh(config.sharding.mesh, devices)
  model = methods.make(config, derived)
  schedule = optim.lr_schedule(config, derived.steps)
  tx = optim.make_optimizer(config, schedule)
  # Files (BEiT-v2's tokenizer) are read and checked before any compute.
  loaded = model.load_state() if materialize else {}
  state, shardings, abstract = create_train_state(config, model, tx, mesh, materialize)
  for name, host in loaded.items():
    state[name] = jax.device_put(host, shardings[name])
  step = make_train_step(model, tx, schedule, mesh, shardings)
  return runtime.Built(mesh=mesh, model=model, tx=tx, schedule=schedule, state=state,
                       shardings=shardings, abstract=abstract, step=step)
