"""BEiT-v2 and DDS-BEiT-v2 (section 4.3, Table 2): masked token prediction.

Parameters are a plain dict:
  encoder:  ViTEncoder in mask-token mode (all patches; masked ones -> [MASK])
  lm_head:  the shared prediction head, width -> vocab_size
  beta:     {"shared": [K]} (if dds.dynamic)
The frozen VQ-KD tokenizer's parameters live in the train state under
`tokenizer`, never in `params`: no gradient or optimizer touches them.

Where this differs from BEiT-v2's code (docs/decisions.md): learned absolute
positions instead of the shared relative position bias, no layer scale, and
no CLS-token pretraining head, so the encoder is the same ViT that DDAE and
MAE pretrain and every evaluation reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax import config_lib, tokenizer_weights
from ddae_jax.model import make_encoder
from ddae_jax.models.tokenizer import VQKDTokenizer, tokenizer_input
from ddae_jax.models.vit import VIT_SIZES
from ddae_jax.objectives import beitv2 as objective
from ddae_jax.objectives import ddae as ddae_objective
from ddae_jax.objectives.dynamic_weights import loss_weights, weight_l2_norm
from ddae_jax.objectives.masking import num_masked


class BEiTv2:
  """Builds the modules of a `method = "beitv2"` config and computes its loss."""

  def __init__(self, config):
    self.config = config
    dtype = jnp.dtype(config.model.dtype)
    self.grid = config_lib.grid_size(config)
    self.num_patches = self.grid[0] * self.grid[1]
    self.num_masked = num_masked(config.masking.ratio, self.grid)
    self.blocks = config_lib.supervised_blocks(config)
    self.block_weights = config_lib.block_weights(config)
    self.beta_branches = config_lib.beta_branches(config)
    # BEiT-v2 learns its positions (decisions.md: absolute instead of relative).
    self.encoder = make_encoder(config, pos_embed="learned")
    t = config.tokenizer
    self.lm_head = nn.Dense(t.vocab_size, dtype=dtype,
                            kernel_init=nn.initializers.truncated_normal(0.02))
    self.tokenizer = VQKDTokenizer(patch_size=t.patch_size, size=t.size, code_dim=t.code_dim,
                                   vocab_size=t.vocab_size, dtype=dtype)

  def _dummy(self):
    size = self.config.model.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32)

  def init(self, rng: jax.Array) -> dict:
    """Fresh trainable parameters (float32)."""
    k_enc, k_head = jax.random.split(rng)
    images = self._dummy()
    mask = jnp.zeros((1, self.num_patches), bool)
    params = {"encoder": self.encoder.init(k_enc, images, mask=mask)["params"]}
    width = config_lib.encoder_dims(self.config)[0]
    params["lm_head"] = self.lm_head.init(k_head, jnp.zeros((1, width)))["params"]
    if self.beta_branches:
      params["beta"] = {"shared": jnp.asarray(config_lib.beta_init(self.config))}
    return params

  def init_tokenizer(self, rng: jax.Array) -> dict:
    """Random tokenizer parameters (tests); `load_tokenizer` reads the real ones."""
    return self.tokenizer.init(rng, self._dummy())["params"]

  def load_tokenizer(self) -> dict:
    """The configured checkpoint's tokenizer parameters (host NumPy). Raises TokenizerMismatch."""
    t = self.config.tokenizer
    tw, td, _ = VIT_SIZES[t.size]
    try:
      return tokenizer_weights.load_tokenizer_params(
          t.checkpoint, width=tw, depth=td, patch_size=t.patch_size,
          num_patches=self.num_patches, code_dim=t.code_dim, vocab_size=t.vocab_size)
    except (OSError, tokenizer_weights.TokenizerMismatch) as err:
      raise config_lib.ConfigError(
          f"config.tokenizer.checkpoint = {t.checkpoint!r} is unusable: {err}\n"
          "Download BEiT-v2's vqkd_encoder_base_decoder_3x768x12_clip-d93179da.pth "
          "(microsoft/unilm, beit2/TOKENIZER.md) and pass its path.") from err

  def tokenize(self, tokenizer_params, images: jax.Array) -> jax.Array:
    """The targets: int32[B, N] codebook indices of uint8 images [B, H, W, 3]."""
    out = self.tokenizer.apply({"params": tokenizer_params}, tokenizer_input(images))
    return jax.lax.stop_gradient(out["indices"])

  def encode(self, encoder_params, images, mask=None) -> dict:
    """The encoder on all patches, masked ones replaced by the mask token."""
    if mask is None:
      mask = jnp.zeros(images.shape[:1] + (self.num_patches,), bool)
    return self.encoder.apply({"params": encoder_params}, images, mask=mask)

  def loss(self, params, images, mask, distance, targets):
    """Masked token prediction with deep dynamic supervision (eq. 3 with CE, eq. 6).

    Args:
      params: the parameter dict (module docstring).
      images: float32[B, H, W, 3], ImageNet-normalised.
      mask: bool[B, N], True = masked, the same count in every row.
      distance: float32[B, N], the distance map of `mask`.
      targets: int32[B, N], the tokenizer's indices for every patch.

    Returns:
      (loss, metrics).
    """
    c = self.config
    features = self.encode(params["encoder"], images, mask)["features"][:, :, 1:]
    ids = objective.masked_ids(mask, self.num_masked)               # [B, M]
    logits = self.lm_head.apply({"params": params["lm_head"]},
                                objective.gather_patches(features, ids))  # [B, K, M, V]
    labels = jnp.take_along_axis(targets, ids, axis=1)
    error = objective.token_cross_entropy(logits, labels)           # [B, K, M]
    if self.beta_branches:
      beta = params["beta"]["shared"]
      weights = objective.gather_patches(loss_weights(distance, mask, beta), ids)
      norms = weight_l2_norm(distance, mask, beta)
    else:
      weights = jnp.ones_like(error)
      norms = jnp.zeros((mask.shape[0], 0), jnp.float32)
    # All gathered positions are masked: the per-image normaliser is M.
    per_block = ddae_objective.weighted_block_losses(
        error, weights, jnp.ones(ids.shape, bool), c.dds.normalizer)
    mim_loss = ddae_objective.deep_loss(per_block, self.block_weights)  # eq. 3, M = CE
    loss = ddae_objective.total_loss(mim_loss, 0.0, norms, c.dds.reg_weight)  # eq. 6
    accuracy = objective.token_accuracy(logits, labels)
    metrics = {"loss": loss, "mim_loss": mim_loss, "mim_accuracy": accuracy[-1],
               "beta_regularizer": jnp.sum(jnp.mean(norms, axis=0)) if norms.size
               else jnp.zeros((), jnp.float32)}
    for i, g in enumerate(self.blocks):
      metrics[f"mim_loss/block_{g}"] = per_block[i]
    return loss, metrics


def host_tokenizer_matches(loaded: dict, abstract: dict) -> None:
  """Raises TokenizerMismatch when converted parameters differ from the model's tree."""
  flat = lambda t: {jax.tree_util.keystr(p): tuple(np.shape(v))
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  a, b = flat(loaded), flat(abstract)
  if a != b:
    diff = sorted(set(a.items()) ^ set(b.items()))
    raise tokenizer_weights.TokenizerMismatch(
        "converted tokenizer parameters differ from the model's: " + ", ".join(
            f"{k} {v}" for k, v in diff[:20]))
