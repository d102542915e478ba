"""DDAE's schedules over training: eq. 4's momentum and BootMAE's distillation weight.

Both count epochs of the run's dataset (config_lib.Steps), as BootMAE's
run_pretraining.py sets them once per epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddae_jax import config_lib


def ema_momentum(config, step: jax.Array, steps: config_lib.Steps) -> jax.Array:
  """m of eq. 4 at `step`, by config.ema.schedule.

  "bootmae" (BootMAE utils.adjust_ema_momentum, once per epoch e = floor(epoch)):
    m = start + e / mid_epochs (mid - start)                      for e < mid_epochs
    m = mid + min(ramp_epochs, e - mid_epochs) / ramp_epochs (end - mid) after.
  "linear": start -> end linearly over ramp_epochs (per step), then end.
  """
  e = config.ema
  if e.schedule == "bootmae":
    epoch = jnp.floor(steps.epoch(step))
    first = e.momentum_start + (e.momentum_mid - e.momentum_start) * (
        epoch / max(e.mid_epochs, 1e-9))
    frac = jnp.clip((epoch - e.mid_epochs) / max(e.ramp_epochs, 1e-9), 0.0, 1.0)
    second = e.momentum_mid + (e.momentum_end - e.momentum_mid) * frac
    return jnp.where(epoch < e.mid_epochs, first, second)
  ramp = steps.of_epochs(e.ramp_epochs)
  frac = jnp.clip(step / max(ramp, 1), 0.0, 1.0) if ramp > 0 else 1.0
  return e.momentum_start + (e.momentum_end - e.momentum_start) * frac


def distill_weight(config, step: jax.Array, steps: config_lib.Steps) -> jax.Array:
  """The self-distillation loss weight at `step` (BootMAE run_pretraining.py).

  Per epoch e = floor(epoch): min((e + 1) / (weight_ramp * epochs), 1), i.e.
  BootMAE's min(4 (e + 1) / E, 1) for weight_ramp = 1/4; 1 when weight_ramp = 0.
  """
  ramp = config.distill.get("weight_ramp", 0.0) * config.epochs
  if ramp <= 0:
    return jnp.ones((), jnp.float32)
  epoch = jnp.floor(steps.epoch(step))
  return jnp.minimum((epoch + 1.0) / ramp, 1.0).astype(jnp.float32)


def ema_update(ema_params, params, momentum):
  """Eq. 4: theta' <- m theta' + (1 - m) theta, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)
