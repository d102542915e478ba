"""DDAE (Fig. 1): the encoder, the two shared decoders, beta, and the loss of eq. 6.

Parameters are a plain dict:
  encoder:          ViTEncoder (online, theta)
  pixel_decoder:    d_phi_p, 2 blocks x 512 -> patch pixels      (if pixel.enabled)
  distill_decoder:  d_phi_d, 2 blocks x D   -> encoder features  (if distill.enabled)
  beta:             {"shared": [K]} or {"pixel": [K], "distill": [K]} (if dds.dynamic)
The momentum encoder (theta') is a second copy of `encoder` held by the train
state and only ever changed by eq. 4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ddae_jax import config_lib
from ddae_jax.methods import schedules
from ddae_jax.methods.base import make_encoder
from ddae_jax.models.decoder import Decoder, decode_per_block
from ddae_jax.objectives import ddae as objective
from ddae_jax.objectives.dynamic_weights import loss_weights, weight_l2_norm
from ddae_jax.objectives.masking import visible_and_masked_ids


class DDAE:
  """DDAE's modules, state and loss (a methods.base.Method); MAE when distillation is off."""

  def __init__(self, config, derived: config_lib.Derived):
    """derived: the run's resolved values (config_lib.resolve); its steps count the epochs
    of the momentum and distillation schedules."""
    self.config = config
    d = self.derived = derived
    dtype = jnp.dtype(config.model.dtype)
    self.grid, self.num_patches, self.blocks = d.grid, d.num_patches, d.blocks
    self.block_weights, self.beta_branches = d.block_weights, d.beta_branches
    self.encoder = make_encoder(config, d)
    p = config.pixel
    self.pixel_decoder = Decoder(
        width=p.decoder_width, depth=p.decoder_depth, num_heads=p.decoder_heads,
        out_dim=config.model.patch_size ** 2 * 3, dtype=dtype, attention_impl=d.attention_impl,
        remat=config.model.remat) if p.enabled else None
    self.distill_decoder = Decoder(
        width=d.width, depth=config.distill.decoder_depth, num_heads=d.heads, out_dim=d.width,
        dtype=dtype, attention_impl=d.attention_impl,
        remat=config.model.remat) if config.distill.enabled else None

  def num_visible(self) -> int:
    return self.num_patches - self.derived.num_masked

  def init(self, rng: jax.Array) -> dict:
    """Fresh parameters (float32)."""
    size = self.config.model.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    k_enc, k_pix, k_dis = jax.random.split(rng, 3)
    params = {"encoder": self.encoder.init(k_enc, images)["params"]}
    out = self.encoder.apply({"params": params["encoder"]}, images)
    ids_restore = jnp.arange(self.num_patches, dtype=jnp.int32)[None]
    if self.pixel_decoder is not None:
      params["pixel_decoder"] = self.pixel_decoder.init(
          k_pix, out["final"], ids_restore, self.grid)["params"]
    if self.distill_decoder is not None:
      params["distill_decoder"] = self.distill_decoder.init(
          k_dis, out["final"], ids_restore, self.grid)["params"]
    if self.beta_branches:
      init = jnp.asarray(self.derived.beta_init, jnp.float32)
      params["beta"] = {b: init for b in self.beta_branches}
    return params

  def init_state(self, params: dict, rng: jax.Array) -> dict:
    """{"ema_params": theta' = a copy of theta} when distillation is on, else {}."""
    del rng
    if self.distill_decoder is None:
      return {}
    return {"ema_params": jax.tree.map(jnp.copy, params["encoder"])}

  def load_state(self) -> dict:
    return {}

  def targets(self, state: dict, batch: dict) -> dict:
    """The momentum encoder's outputs on every patch, and w_d at this step (distillation)."""
    if self.distill_decoder is None:
      return {}
    # The momentum encoder sees every patch; no gradient reaches it.
    ema_out = jax.lax.stop_gradient(self.encode(state["ema_params"], batch["input"]))
    return {"targets": ema_out, "distill_weight": self._distill_weight(state["step"])}

  def _distill_weight(self, step):
    return schedules.distill_weight(self.config, step, self.derived.steps)

  def after_update(self, state: dict, params: dict) -> tuple[dict, dict]:
    """Eq. 4: the momentum encoder follows the updated online encoder."""
    if self.distill_decoder is None:
      return {}, {}
    momentum = schedules.ema_momentum(self.config, state["step"], self.derived.steps)
    ema = schedules.ema_update(state["ema_params"], params["encoder"], momentum)  # eq. 4
    return {"ema_params": ema}, {"ema_momentum": jnp.asarray(momentum, jnp.float32),
                                 "distill_weight": self._distill_weight(state["step"])}

  def encode(self, encoder_params, images, ids_keep=None) -> dict:
    """The encoder on visible patches (ids_keep) or all of them (None)."""
    return self.encoder.apply({"params": encoder_params}, images, ids_keep)

  def _branch(self, params, branch, features, distance, mask):
    """One branch's supervision: (its f^(g_i) [B, K', ...], weights [B, K', N], lambda, blocks).

    K' = K, or 1 (the last supervised block) when the branch's DDS is off (Table 4).
    """
    blocks, lambdas, dynamic = dataclasses.astuple(self.derived.branches[branch])
    if len(blocks) < len(self.blocks):
      features = features[:, -1:]
    if not dynamic:
      weights = jnp.broadcast_to(mask[:, None, :], (mask.shape[0], len(blocks), mask.shape[1]))
      return features, weights.astype(jnp.float32), lambdas, blocks
    beta = params["beta"][branch if branch in params["beta"] else "shared"]
    return features, loss_weights(distance, mask, beta), lambdas, blocks

  def loss(self, params, images, mask, distance, targets=None, distill_weight=1.0):
    """Eq. 6 for one batch.

    Args:
      params: the parameter dict (module docstring).
      images: float32[B, H, W, 3], normalised.
      mask: bool[B, N], True = masked, the same count in every row.
      distance: float32[B, N], the distance map of `mask`.
      targets: the momentum encoder's outputs on all patches (`encode`; distillation).
      distill_weight: w_d of L_distill in eq. 6 (BootMAE's ramp, `schedules.distill_weight`).

    Returns:
      (loss, metrics): the scalar of eq. 6 and a dict of its parts.
    """
    c = self.config
    ids_keep, ids_restore = visible_and_masked_ids(mask, self.num_visible())
    features = self.encode(params["encoder"], images, ids_keep)["features"]
    metrics = {}
    zero = jnp.zeros((), jnp.float32)
    pixel_loss = distill_loss = zero

    if self.pixel_decoder is not None:
      feats, weights, lambdas, blocks = self._branch(params, "pixel", features, distance, mask)
      pred = decode_per_block(self.pixel_decoder, {"params": params["pixel_decoder"]},
                              feats, ids_restore, self.grid)
      target = objective.pixel_targets(images, c.model.patch_size, c.pixel.norm_pix,
                                       c.pixel.get("norm_pix_stats", "per_patch"))
      per_block = objective.weighted_block_losses(
          objective.per_patch_error(pred, target), weights, mask, c.dds.normalizer)
      pixel_loss = objective.deep_loss(per_block, lambdas)  # eq. 3
      metrics.update({f"pixel_loss/block_{g}": per_block[i] for i, g in enumerate(blocks)})

    if self.distill_decoder is not None:
      feats, weights, lambdas, blocks = self._branch(params, "distill", features, distance, mask)
      pred = decode_per_block(self.distill_decoder, {"params": params["distill_decoder"]},
                              feats, ids_restore, self.grid)
      target = objective.feature_targets(targets, c.distill.target_norm)[:, -len(blocks):]
      if c.distill.get("pred_norm", False):
        pred = objective.layer_norm(pred)  # BootMAE: LN(prediction) vs LN(target)
      per_block = objective.weighted_block_losses(
          objective.per_patch_error(pred, target), weights, mask, c.dds.normalizer)
      distill_loss = objective.deep_loss(per_block, lambdas)  # eq. 5
      metrics.update({f"distill_loss/block_{g}": per_block[i] for i, g in enumerate(blocks)})

    if self.beta_branches:
      norms = jnp.concatenate([weight_l2_norm(distance, mask, params["beta"][b])
                               for b in self.beta_branches], axis=1)
    else:
      norms = jnp.zeros((mask.shape[0], 0), jnp.float32)
    loss = objective.total_loss(pixel_loss, distill_loss, norms, c.dds.reg_weight,
                                distill_weight)  # eq. 6
    metrics.update(loss=loss, pixel_loss=pixel_loss, distill_loss=distill_loss,
                   beta_regularizer=jnp.sum(jnp.mean(norms, axis=0)))
    return loss, metrics
