"""The optimizer (AdamW with a warm-up cosine schedule), beta's own group, and eq. 4.

Parameters fall in three groups:
  decay:    weight matrices, trained with AdamW and weight decay;
  no_decay: biases, norms, class and mask tokens (MAE's exclusions);
  beta:     the dynamic-loss exponents of eq. 2, trained by Adam without weight
            decay (decay would pull them to 0, which is the regulariser's job),
            or frozen when config.dds.beta_learnable is False.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ddae_jax import config_lib
from ddae_jax.sharding import path_str

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def param_labels(params):
  """'decay' | 'no_decay' | 'beta' for every parameter leaf."""
  def label(path, leaf):
    name = path_str(path)
    if name.startswith("beta"):
      return "beta"
    if leaf.ndim < 2 or name.split("/")[-1] in NO_DECAY_NAMES:
      return "no_decay"
    return "decay"
  return jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(config, num_images: int | None = None) -> optax.Schedule:
  """Linear warm-up to base_lr * batch / 256, then cosine decay to min_lr.

  Epochs are passes over `num_images` (None: config.num_train_images).
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config_lib.learning_rate(config),
      warmup_steps=config_lib.epochs_to_steps(config, config.optim.warmup_epochs, num_images),
      decay_steps=config_lib.total_steps(config, num_images),
      end_value=config.optim.min_lr)


def make_optimizer(config, num_images: int | None = None) -> optax.GradientTransformation:
  o = config.optim
  schedule = lr_schedule(config, num_images)
  adamw = lambda wd: optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd)
  if config.dds.beta_learnable:
    beta_opt = optax.adam(lambda step: schedule(step) * o.beta_lr_scale, b1=o.b1, b2=o.b2,
                          eps=o.eps)
  else:
    beta_opt = optax.set_to_zero()
  tx = optax.multi_transform(
      {"decay": adamw(o.weight_decay), "no_decay": adamw(0.0), "beta": beta_opt},
      param_labels)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def _epoch(config, step: jax.Array, num_images: int | None = None) -> jax.Array:
  """The (fractional) epoch at `step` over `num_images` (None: config.num_train_images)."""
  num_images = config.num_train_images if num_images is None else num_images
  return step * (config.batch_size / num_images)


def ema_momentum(config, step: jax.Array, num_images: int | None = None) -> jax.Array:
  """m of eq. 4 at `step`, by config.ema.schedule.

  "bootmae" (BootMAE utils.adjust_ema_momentum, once per epoch e = floor(epoch)):
    m = start + e / mid_epochs (mid - start)                      for e < mid_epochs
    m = mid + min(ramp_epochs, e - mid_epochs) / ramp_epochs (end - mid) after.
  "linear": start -> end linearly over ramp_epochs (per step), then end.
  """
  e = config.ema
  if e.schedule == "bootmae":
    epoch = jnp.floor(_epoch(config, step, num_images))
    first = e.momentum_start + (e.momentum_mid - e.momentum_start) * (
        epoch / max(e.mid_epochs, 1e-9))
    frac = jnp.clip((epoch - e.mid_epochs) / max(e.ramp_epochs, 1e-9), 0.0, 1.0)
    second = e.momentum_mid + (e.momentum_end - e.momentum_mid) * frac
    return jnp.where(epoch < e.mid_epochs, first, second)
  ramp = config_lib.epochs_to_steps(config, e.ramp_epochs, num_images)
  frac = jnp.clip(step / max(ramp, 1), 0.0, 1.0) if ramp > 0 else 1.0
  return e.momentum_start + (e.momentum_end - e.momentum_start) * frac


def distill_weight(config, step: jax.Array, num_images: int | None = None) -> jax.Array:
  """The self-distillation loss weight at `step` (BootMAE run_pretraining.py).

  Per epoch e = floor(epoch): min((e + 1) / (weight_ramp * epochs), 1), i.e.
  BootMAE's min(4 (e + 1) / E, 1) for weight_ramp = 1/4; 1 when weight_ramp = 0.
  """
  ramp = config.distill.get("weight_ramp", 0.0) * config.epochs
  if ramp <= 0:
    return jnp.ones((), jnp.float32)
  epoch = jnp.floor(_epoch(config, step, num_images))
  return jnp.minimum((epoch + 1.0) / ramp, 1.0).astype(jnp.float32)


def ema_update(ema_params, params, momentum):
  """Eq. 4: theta' <- m theta' + (1 - m) theta, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)
