"""BEiT-v2 and DDS-BEiT-v2 (section 4.3, Table 2): masked token prediction.

Parameters are a plain dict:
  encoder:      ViTEncoder in mask-token mode (all patches; masked ones -> [MASK]),
                BEiT's student with the config's defaults: no absolute positions,
                a shared relative position bias, layer scale 0.1
  cls_pt_head:  BEiT-v2's class-token head, `cls_pt.head_depth` blocks (if
                cls_pt.early_block > 0)
  lm_head:      the shared prediction head, width -> vocab_size
  beta:         {"shared": [K]} (if dds.dynamic)
The frozen VQ-KD tokenizer's parameters live in the train state under
`tokenizer`, never in `params`: no gradient or optimizer touches them.
What follows BEiT-v2's code and what does not: docs/decisions.md.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddae_jax import config_lib
from ddae_jax.methods.base import make_encoder
from ddae_jax.models.tokenizer import VQKDTokenizer, tokenizer_input
from ddae_jax.models.vit import VIT_SIZES, Block, layer_norm
from ddae_jax.objectives import beitv2 as objective
from ddae_jax.objectives import ddae as ddae_objective
from ddae_jax.objectives.dynamic_weights import loss_weights, weight_l2_norm
from ddae_jax.weights import state_dict, vqkd


class BEiTv2:
  """Builds the modules of a `method = "beitv2"` config and computes its loss."""

  def __init__(self, config, derived: config_lib.Derived):
    """derived: the run's resolved values (config_lib.resolve)."""
    self.config = config
    d = self.derived = derived
    dtype = jnp.dtype(config.model.dtype)
    self.grid, self.num_patches, self.num_masked = d.grid, d.num_patches, d.num_masked
    self.blocks, self.block_weights, self.beta_branches = d.blocks, d.block_weights, d.beta_branches
    self.early_block = config.cls_pt.early_block
    self.encoder = make_encoder(config, d).clone(
        extra_hidden_blocks=(self.early_block, d.depth) if self.early_block else ())
    self.cls_pt_head = ClsPretrainHead(
        num_heads=d.heads, depth=config.cls_pt.head_depth, layer_scale=config.model.layer_scale,
        dtype=dtype, attention_impl=d.attention_impl) if self.early_block else None
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
    k_enc, k_head, k_cls = jax.random.split(rng, 3)
    images = self._dummy()
    mask = jnp.zeros((1, self.num_patches), bool)
    params = {"encoder": self.encoder.init(k_enc, images, mask=mask)["params"]}
    width = self.derived.width
    if self.cls_pt_head is not None:
      out = jax.eval_shape(self.encode, params["encoder"], images, mask)
      tokens = jnp.zeros(out["final"].shape, jnp.float32)
      bias = out.get("attention_bias")
      params["cls_pt_head"] = self.cls_pt_head.init(
          k_cls, tokens, None if bias is None else jnp.zeros(bias.shape, bias.dtype))["params"]
    params["lm_head"] = self.lm_head.init(k_head, jnp.zeros((1, width)))["params"]
    if self.beta_branches:
      params["beta"] = {"shared": jnp.asarray(self.derived.beta_init, jnp.float32)}
    return params

  def init_tokenizer(self, rng: jax.Array) -> dict:
    """Random tokenizer parameters (tests); `load_tokenizer` reads the real ones."""
    return self.tokenizer.init(rng, self._dummy())["params"]

  def init_state(self, params: dict, rng: jax.Array) -> dict:
    """{"tokenizer": ...}: random here; `load_state` reads the checkpoint's weights."""
    del params
    return {"tokenizer": self.init_tokenizer(jax.random.fold_in(rng, 1))}

  def load_state(self) -> dict:
    """{"tokenizer": the configured checkpoint's weights, checked against the model's tree}.

    {} with tokenizer.random_weights (tests, compile checks). Read before any compute.
    """
    if self.config.tokenizer.random_weights:
      return {}
    loaded = self.load_tokenizer()
    host_tokenizer_matches(loaded, jax.eval_shape(self.init_tokenizer, jax.random.key(0)))
    return {"tokenizer": loaded}

  def targets(self, state: dict, batch: dict) -> dict:
    """The frozen tokenizer's codes of the un-normalised crop."""
    return {"targets": self.tokenize(state["tokenizer"], batch["image"])}

  def after_update(self, state: dict, params: dict) -> tuple[dict, dict]:
    del state, params
    return {}, {}

  def load_tokenizer(self) -> dict:
    """The configured checkpoint's tokenizer parameters (host NumPy). Raises TokenizerMismatch."""
    t = self.config.tokenizer
    tw, td, _ = VIT_SIZES[t.size]
    try:
      return vqkd.load_tokenizer_params(
          t.checkpoint, width=tw, depth=td, patch_size=t.patch_size,
          num_patches=self.num_patches, code_dim=t.code_dim, vocab_size=t.vocab_size)
    except (OSError, state_dict.ConvertError, vqkd.TokenizerMismatch) as err:
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

  def cls_pt_logits(self, params, encoded: dict, ids: jax.Array) -> jax.Array:
    """The class-token head's logits at the masked patches ids [B, M]: [B, 1, M, V].

    [last block's class token, block `early_block`'s patch tokens] -> the head's
    blocks -> the encoder's final norm and the shared LM head (`shared_lm_head`).
    """
    early, last = encoded["extra_hidden"][:, 0], encoded["extra_hidden"][:, 1]
    x = jnp.concatenate([last[:, :1], early[:, 1:]], axis=1)
    x = self.cls_pt_head.apply({"params": params["cls_pt_head"]}, x,
                               encoded.get("attention_bias"))
    x = layer_norm("norm", self.encoder.dtype).apply(
        {"params": params["encoder"]["norm"]}, x[:, None, 1:])
    return self.lm_head.apply({"params": params["lm_head"]}, objective.gather_patches(x, ids))

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
    out = self.encode(params["encoder"], images, mask)
    features = out["features"][:, :, 1:]
    ids = objective.masked_ids(mask, self.num_masked)               # [B, M]
    logits = self.lm_head.apply({"params": params["lm_head"]},
                                objective.gather_patches(features, ids))  # [B, K, M, V]
    labels = jnp.take_along_axis(targets, ids, axis=1)
    cls_pt_loss = jnp.zeros((), jnp.float32)
    if self.cls_pt_head is not None:
      cls_logits = self.cls_pt_logits(params, out, ids)              # [B, 1, M, V]
      cls_pt_loss = jnp.mean(objective.token_cross_entropy(cls_logits, labels))
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
    # eq. 6, plus BEiT-v2's class-token head loss, added with weight 1 as its code does.
    loss = ddae_objective.total_loss(mim_loss + cls_pt_loss, 0.0, norms, c.dds.reg_weight)
    accuracy = objective.token_accuracy(logits, labels)
    metrics = {"loss": loss, "mim_loss": mim_loss, "mim_accuracy": accuracy[-1],
               "cls_pt_loss": cls_pt_loss,
               "beta_regularizer": jnp.sum(jnp.mean(norms, axis=0)) if norms.size
               else jnp.zeros((), jnp.float32)}
    for i, g in enumerate(self.blocks):
      metrics[f"mim_loss/block_{g}"] = per_block[i]
    return loss, metrics


class ClsPretrainHead(nn.Module):
  """BEiT-v2's class-token pretraining head (`cls_pt_layers`): `depth` more blocks.

  Its input joins the last block's class token with an early block's patch
  tokens, so the class token must gather the image's information for the
  patches to be predicted from shallow features (BEiT-v2, section 3.2).
  """
  num_heads: int
  depth: int = 2
  layer_scale: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, attention_bias=None):
    """x: [B, 1 + N, D] raw tokens; attention_bias: the encoder's shared one. -> [B, 1 + N, D]."""
    for i in range(self.depth):
      x = Block(self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                layer_scale=self.layer_scale, name=f"block_{i}")(x, True, attention_bias)
    return x


def host_tokenizer_matches(loaded: dict, abstract: dict) -> None:
  """Raises TokenizerMismatch when converted parameters differ from the model's tree."""
  vqkd.check_params(loaded, abstract)
