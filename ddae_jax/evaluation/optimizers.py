"""The evaluation optimizers: AdamW with layer-wise lr decay, and MAE's LARS.

Layer-wise decay (BEiT): the embeddings (patch_embed, cls_token, pos_embed)
are layer 0, block i is layer i + 1, everything after the blocks (the final
norm, fc_norm, the head) is layer L + 1; a parameter's learning rate is
lr * decay^(L + 1 - layer), so the head trains at the full rate and the
embeddings at decay^(L + 1) of it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ddae_jax.sharding import path_str

EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed")
# MAE's no_weight_decay list, besides every 1-D parameter (biases, norms).
NO_DECAY_NAMES = ("cls_token", "pos_embed")


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


def weight_decay_mask(params):
  """True where AdamW decays: weight matrices, not biases, norms, cls_token, pos_embed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf.ndim >= 2 and path_str(path).split("/")[-1] not in NO_DECAY_NAMES,
      params)


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int,
                  end: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then half-cosine to `end` (MAE's per-step schedule)."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 1), end)


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


class LarsState(NamedTuple):
  momentum: optax.Updates


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         weight_decay: float = 0.0, trust_coefficient: float = 0.001
         ) -> optax.GradientTransformation:
  """MAE's LARS (util/lars.py), for the linear probe.

  For parameters with more than one dimension: d = g + wd * p, then
  d *= trust * |p| / |d| where both norms are > 0 (else 1). Biases and other
  1-D parameters get neither decay nor adaptation. Then mu = momentum * mu + d
  and p -= lr * mu (lr outside the momentum, as torch's loop).
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    return (LarsState(jax.tree.map(jnp.zeros_like, params)), optax.ScaleByScheduleState(
        count=jnp.zeros([], jnp.int32)))

  def adapt(g, p):
    if p.ndim <= 1:
      return g
    d = g + weight_decay * p
    p_norm, d_norm = jnp.linalg.norm(p), jnp.linalg.norm(d)
    q = jnp.where((p_norm > 0) & (d_norm > 0),
                  trust_coefficient * p_norm / jnp.where(d_norm > 0, d_norm, 1.0), 1.0)
    return d * q

  def update(grads, state, params):
    lars_state, count_state = state
    adapted = jax.tree.map(adapt, grads, params)
    mu = jax.tree.map(lambda m, d: momentum * m + d, lars_state.momentum, adapted)
    lr = schedule(count_state.count)
    updates = jax.tree.map(lambda m: -lr * m, mu)
    return updates, (LarsState(mu), optax.ScaleByScheduleState(
        count=optax.safe_int32_increment(count_state.count)))

  return optax.GradientTransformation(init, update)
