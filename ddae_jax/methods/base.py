"""What the train step asks of a pretraining method, and the encoder every method builds.

The step (train_step.py) is the same for DDAE and BEiT-v2: it draws the mask,
asks the method for its targets, differentiates its loss, applies the update
and lets the method change its own state (eq. 4's momentum encoder). It never
looks at which keys the state holds: the method says (`init_state`).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from ddae_jax import config_lib
from ddae_jax.models.vit import ViTEncoder


class Method(Protocol):
  """A pretraining method: its modules, its part of the state, its targets and its loss.

  The train state is {"step", "params", "opt_state", "rng"} plus the entries of
  `init_state` (a frozen tokenizer, a momentum encoder); only `params` is trained.
  """
  config: Any                  # the pretraining ConfigDict
  derived: config_lib.Derived  # its derived values, resolved once
  grid: tuple[int, int]        # patch rows and columns
  blocks: tuple[int, ...]      # the supervised blocks g_1 < ... < g_K (1-based)

  def init(self, rng: jax.Array) -> dict:
    """Fresh trainable parameters (float32)."""

  def init_state(self, params: dict, rng: jax.Array) -> dict:
    """The method's own state entries beside the trained `params` (random ones for files)."""

  def load_state(self) -> dict:
    """Entries of `init_state` read from files (host arrays, checked), or {}."""

  def targets(self, state: dict, batch: dict) -> dict:
    """Keyword arguments of `loss` that come from the state, without gradient: "targets"
    (DDAE: the momentum encoder's outputs; BEiT-v2: the tokenizer's codes) and others the
    loss needs at this step (DDAE: "distill_weight"); {} when there are none (MAE).

    batch: {"image": uint8[B, H, W, 3], "input": the ImageNet-normalised float32 images}.
    """

  def loss(self, params: dict, images: jax.Array, mask: jax.Array, distance: jax.Array,
           targets=None, **step_values) -> tuple[jax.Array, dict]:
    """(the scalar loss of eq. 6, metrics) for normalised images, mask and its distances."""

  def after_update(self, state: dict, params: dict) -> tuple[dict, dict]:
    """(state entries, metrics) after the optimizer made `params` of step state["step"]."""


def make_encoder(config, d: config_lib.Derived, pos_embed: str | None = None) -> ViTEncoder:
  """The config's ViT, reporting its supervised blocks g_i (pos_embed: default the config's)."""
  return ViTEncoder(
      patch_size=config.model.patch_size, width=d.width, depth=d.depth, num_heads=d.heads,
      feature_blocks=d.blocks, feature_norm=config.model.feature_norm,
      dtype=jnp.dtype(config.model.dtype), attention_impl=d.attention_impl,
      remat=config.model.remat, pos_embed=pos_embed or config.model.get("pos_embed", "sincos"),
      # .get: configs saved before these fields existed are plain ViTs.
      rel_pos_bias=config.model.get("rel_pos_bias", False),
      layer_scale=config.model.get("layer_scale", 0.0))
