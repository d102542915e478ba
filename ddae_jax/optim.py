"""Every optimizer: pretraining's AdamW with beta's own group, fine-tuning's AdamW with
layer-wise lr decay, the linear probe's LARS; one no-decay rule, one schedule. The
method's own schedules (eq. 4's momentum, the distillation ramp) are in methods/schedules.py.

Pretraining parameters fall in three groups:
  decay:    weight matrices, trained with AdamW and weight decay;
  no_decay: every 1-D parameter (biases, norms) and config.optim.no_decay_names (the
            lineage's: DDAE and BEiT-v2 cls_token and pos_embed, the MAE rows none);
  beta:     the dynamic-loss exponents of eq. 2, trained by Adam without weight
            decay (decay would pull them to 0, which is the regulariser's job),
            or frozen when config.dds.beta_learnable is False.

Layer-wise decay (BEiT, fine-tuning): the embeddings (patch_embed, cls_token,
pos_embed) are layer 0, block i is layer i + 1, everything after the blocks
(the final norm, fc_norm, the head) is layer L + 1; a parameter's learning rate
is lr * decay^(L + 1 - layer), so the head trains at the full rate and the
embeddings at decay^(L + 1) of it.
"""

from __future__ import annotations

import functools

import jax
import optax

from ddae_jax import config_lib
from ddae_jax.sharding import path_str

# Kept out of fine-tuning's weight decay besides every 1-D parameter (biases, norms):
# timm's and MAE's fine-tuning list. Pretraining takes config.optim.no_decay_names, its
# lineage's (docs/decisions.md, issue 24): BootMAE's and BEiT-v2's pretraining skip
# cls_token and pos_embed and decay their mask tokens; MAE's (timm's add_weight_decay, no
# skip list) decays cls_token and mask_token, its pos_embed is frozen.
NO_DECAY_NAMES = ("cls_token", "pos_embed")
EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed")


def decays(name: str, leaf, no_decay_names=NO_DECAY_NAMES) -> bool:
  """Whether AdamW decays the parameter at `name`: >= 2-D and not named in the list."""
  return leaf.ndim >= 2 and name.split("/")[-1] not in tuple(no_decay_names)


def param_labels(params, no_decay_names=NO_DECAY_NAMES):
  """'decay' | 'no_decay' | 'beta' for every parameter leaf."""
  def label(path, leaf):
    name = path_str(path)
    if name.startswith("beta"):
      return "beta"
    return "decay" if decays(name, leaf, no_decay_names) else "no_decay"
  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params):
  """True where AdamW decays: weight matrices, not biases, norms or NO_DECAY_NAMES."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: decays(path_str(path), leaf),
                                          params)


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int,
                  end: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then half-cosine to `end` (MAE's per-step schedule)."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 1), end)


def lr_schedule(config, steps: config_lib.Steps) -> optax.Schedule:
  """Linear warm-up to base_lr * batch / 256, then cosine decay to min_lr (every protocol),
  over the run's steps (checked to have a step of decay where the run resolved them:
  config_lib.resolve, evaluation/loop.resolve_steps)."""
  return warmup_cosine(steps.peak_lr, steps.warmup, steps.total, config.optim.min_lr)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Pretraining's AdamW (decay / no_decay groups) and beta's Adam, both on `schedule`."""
  o = config.optim
  adamw = lambda wd: optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd)
  if config.dds.beta_learnable:
    beta_opt = optax.adam(lambda step: schedule(step) * o.beta_lr_scale, b1=o.b1, b2=o.b2,
                          eps=o.eps)
  else:
    beta_opt = optax.set_to_zero()
  tx = optax.multi_transform(
      {"decay": adamw(o.weight_decay), "no_decay": adamw(0.0), "beta": beta_opt},
      functools.partial(param_labels, no_decay_names=tuple(o.no_decay_names)))
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


# ------------------------------------------------------------ fine-tuning, linear probe
def layer_id(name: str, depth: int) -> int:
  """BEiT's layer of the parameter at `name` ("encoder/block_3/attn/qkv/kernel" -> 4)."""
  for part in name.split("/"):
    if part in EMBEDDING_NAMES:
      return 0
    if part.startswith("block_"):
      return int(part[len("block_"):]) + 1
  return depth + 1


def layer_scales(params, depth: int, decay: float):
  """decay^(depth + 1 - layer_id) for every leaf of `params` (a tree of floats)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(decay ** (depth + 1 - layer_id(path_str(path), depth))), params)


def adamw_layer_decay(schedule: optax.Schedule, params, depth: int, layer_decay: float,
                      weight_decay: float, b1: float = 0.9, b2: float = 0.999,
                      grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """AdamW whose step for each parameter is scaled by its layer's decay factor.

  As torch's AdamW with BEiT's param groups: the group lr (lr * scale) also
  multiplies the decoupled weight decay, so the scale goes after both.
  """
  scales = layer_scales(params, depth, layer_decay)
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
            optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params)),
            _scale_by_tree(scales),
            optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts)


def _scale_by_tree(scales) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         weight_decay: float = 0.0, trust_coefficient: float = 0.001
         ) -> optax.GradientTransformation:
  """MAE's LARS (util/lars.py), for the linear probe, from optax's parts.

  For parameters with more than one dimension: d = g + wd * p, then
  d *= trust * |p| / |d| where both norms are > 0 (else 1). Biases and other
  1-D parameters get neither decay nor adaptation. Then mu = momentum * mu + d
  and p -= lr * mu (lr outside the momentum, as torch's loop).
  """
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.masked(optax.chain(optax.add_decayed_weights(weight_decay),
                               optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)),
                   matrices),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate))
