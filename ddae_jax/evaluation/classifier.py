"""The classifiers the protocols train, and how a pretraining encoder goes into them.

Fine-tuning trains `ViTClassifier`: the encoder (learned position table
initialised from sin-cos), then pooling, then a linear head. Pooling "avg"
is MAE's global pool: the mean of the last block's raw patch tokens (no class
token) through a fresh LayerNorm `fc_norm`; "cls" is the class token after
the encoder's final `norm`. Linear probing and k-NN read `frozen_features`
with the same two choices, of a chosen block (evaluation/readout.py; "avg"
through fc_norm at its initialisation, as MAE's and BootMAE's probes leave
it), and train only `ProbeHead`.

The pretraining encoder also holds `feature_norm_{g}` LayerNorms for its
supervised intermediate blocks; no classifier reads intermediate blocks, so
`encoder_for_classifier` drops them.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddae_jax import config_attention, config_lib, sharding
from ddae_jax.evaluation import readout
from ddae_jax.models.vit import ViTEncoder, sincos_pos_embed
from ddae_jax.objectives.ddae import layer_norm
from ddae_jax.weights import checkpoints, pretrained, torch_vit


class ViTClassifier(nn.Module):
  """Encoder + pooling + head. Parameters: encoder/..., fc_norm (avg only), head."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  num_classes: int
  pooling: str = "avg"
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None
  remat: bool = False
  head_init_std: float = 2e-5  # MAE's fine-tuning head: trunc_normal(2e-5)

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    """float[B, H, W, 3] (normalised) -> float32 logits [B, num_classes]."""
    out = encoder_module(self, pos_embed="learned", name="encoder")(
        images, deterministic=deterministic)
    pooled = pool(out, self.pooling)
    if self.pooling == "avg":
      pooled = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(pooled)
    head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.initializers.truncated_normal(self.head_init_std))
    return head(pooled).astype(jnp.float32)


class ProbeHead(nn.Module):
  """MAE's linear-probe head: BatchNorm without affine parameters (eps 1e-6), then linear."""
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool):
    """float[B, D] -> float32 logits [B, num_classes]; updates batch_stats when train."""
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                     use_scale=False, use_bias=False, name="bn")(features.astype(jnp.float32))
    return nn.Dense(self.num_classes, name="head",
                    kernel_init=nn.initializers.truncated_normal(0.01))(x)


def encoder_module(m, pos_embed: str = "sincos", name: str | None = None) -> ViTEncoder:
  """The ViTEncoder of a classifier-like module `m` (width, depth, ... attributes)."""
  return ViTEncoder(patch_size=m.patch_size, width=m.width, depth=m.depth,
                    num_heads=m.num_heads, feature_blocks=(m.depth,), feature_norm="final",
                    drop_path=getattr(m, "drop_path", 0.0), dtype=m.dtype,
                    attention_impl=m.attention_impl, remat=getattr(m, "remat", False),
                    pos_embed=pos_embed, name=name)


def pool(out: dict, pooling: str) -> jax.Array:
  """ViTEncoder outputs -> [B, D]: "cls" normed class token, "avg" raw patch-token mean."""
  if pooling == "cls":
    return out["final"][:, 0]
  if pooling == "avg":
    return out["hidden"][:, -1, 1:].mean(axis=1)
  raise ValueError(f"pooling={pooling!r}: allowed 'avg', 'cls'")


def classifier_from_config(config, num_classes: int | None = None,
                           platform: str | None = None) -> ViTClassifier:
  """The evaluation config's classifier; its attention follows `platform` (default jax's)."""
  m = config.model
  width, depth, heads = config_lib.encoder_dims(config)
  return ViTClassifier(
      patch_size=m.patch_size, width=width, depth=depth, num_heads=heads,
      num_classes=num_classes or m.num_classes, pooling=m.pooling,
      drop_path=m.get("drop_path", 0.0), dtype=jnp.dtype(m.dtype),
      attention_impl=config_attention.attention_impl(config, platform), remat=m.remat)


def frozen_readout(config) -> tuple[int, str]:
  """(block, pooling) that linear probing and k-NN read (evaluation/readout.py).

  model.block 0 and model.pooling "auto" follow the lineage of the pretraining
  run in config.init_dir (its config.json); a random encoder, or a run
  without one, follows DDAE's.
  """
  depth = config_lib.encoder_dims(config)[1]
  saved = None
  if not config.random_init and config.init_dir and (
      config.model.get("block", 0) == 0 or config.model.pooling == "auto"):
    saved = pretrained.load_config(config.init_dir)
  block, pooling = readout.resolve(config.model.get("block", 0), config.model.pooling, depth,
                                   saved)
  logging.info("Reading the %s (%s lineage)", readout.describe(block, pooling, depth),
               readout.lineage(saved))
  return block, pooling


def frozen_encoder(config, block: int | None = None) -> ViTEncoder:
  """The encoder linear probing and k-NN run, ending at `block` (None: the last).

  Positions are a (frozen) parameter: the sin-cos table for our pretraining
  runs, the checkpoint's own table for imported timm/MAE or BEiT-v2 encoders.
  """
  encoder = encoder_module(classifier_from_config(config), pos_embed="learned")
  if block is None or block == encoder.depth:
    return encoder
  return encoder.clone(depth=block, feature_blocks=(block,))


def frozen_features(encoder: ViTEncoder, params, images, pooling: str) -> jax.Array:
  """float[B, H, W, 3] (normalised) -> float32[B, D] features, no gradient.

  "avg" is the patch-token mean through MAE's and BootMAE's `fc_norm` as the
  linear probe meets it: a LayerNorm (eps 1e-6) left at its initialisation,
  i.e. without scale or offset (neither checkpoint holds one; the probe
  freezes it). "cls": the class token after the encoder's final norm.
  """
  out = encoder.apply({"params": params}, images)
  features = pool(out, pooling).astype(jnp.float32)
  if pooling == "avg":
    features = layer_norm(features)  # the same non-affine norm as the distillation targets
  return jax.lax.stop_gradient(features)


def expected_encoder(encoder: ViTEncoder, image_size: int):
  """The encoder's parameter shapes (ShapeDtypeStructs), without computing anything."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), images))["params"]


def encoder_for_classifier(found: dict, expected: dict, image_size: int,
                           patch_size: int, where: str = "checkpoint") -> dict:
  """A pretraining encoder reshaped for a classifier's encoder, checked against `expected`.

  Drops what only pretraining uses: the intermediate `feature_norm_*` norms
  and BEiT-v2's `mask_token`. Inserts the sin-cos table as `pos_embed` when
  `expected` has a learned one and the checkpoint has none, and resamples a
  checkpoint's table to this image size's grid (bicubic, as timm).
  Raises pretrained.CheckpointMismatch naming expected and found shapes.
  """
  params = {k: v for k, v in found.items()
            if not k.startswith("feature_norm_") and k != "mask_token"}
  grid = (image_size // patch_size,) * 2
  if "pos_embed" in expected and "pos_embed" not in params:
    width = np.shape(params.get("patch_embed", {}).get("kernel", (0, 0)))[-1]
    if width and width % 4 == 0:
      params["pos_embed"] = sincos_pos_embed(width, grid)[None]
  elif "pos_embed" in expected and np.shape(params["pos_embed"]) != expected["pos_embed"].shape:
    pos = np.asarray(params["pos_embed"])
    if pos.ndim == 3 and pos.shape[-1] == expected["pos_embed"].shape[-1]:
      params["pos_embed"] = torch_vit.resample_pos_embed(pos, grid)
  pretrained.check_encoder(params, expected, what=where)
  return params


def restore_encoder(config, expected: dict, image_size: int, patch_size: int) -> dict | None:
  """The chosen encoder of config.init_dir as host arrays, fitted to `expected`.

  None when config.random_init (the randomly initialised baseline).

  Raises:
    ConfigError: no init_dir given.
    CheckpointMissing: the workdir or its checkpoint does not exist.
    CheckpointMismatch: the checkpoint holds another model size; the message
      names the expected and the found architecture and every differing shape.
  """
  if config.random_init:
    logging.warning("config.random_init: evaluating a randomly initialised encoder")
    return None
  init_dir = config.init_dir
  if not init_dir:
    raise config_lib.ConfigError(
        "config.init_dir = '' is invalid: allowed a pretraining workdir "
        "(--config.init_dir=DIR holding checkpoints/<step>/state)")
  if not epath.Path(init_dir).exists():
    raise checkpoints.CheckpointMissing(
        f"config.init_dir = {init_dir!r}: expected a pretraining workdir with "
        "checkpoints/<step>/state, found no such directory")
  step = None if config.init_step < 0 else int(config.init_step)
  found, step = pretrained.load_encoder(init_dir, config.encoder, step)
  where = f"checkpoint {init_dir} (step {step}, {config.encoder} encoder)"
  saved = pretrained.load_config(init_dir)
  if saved is not None and "model" in saved:
    where += f", pretrained as model.size={saved.model.get('size')!r}"
  params = encoder_for_classifier(found, expected, image_size, patch_size, where)
  logging.info("Restored the %s encoder of %s, step %d", config.encoder, init_dir, step)
  return params


def frozen_encoder_params(config, encoder: ViTEncoder, mesh):
  """The pretrained (or, with config.random_init, random) encoder, replicated on the mesh.

  Checked against the whole encoder of config.model.size; an `encoder` that
  ends at an earlier block gets only the blocks it runs.
  """
  size = config.model.image_size
  whole = frozen_encoder(config)
  params = restore_encoder(config, expected_encoder(whole, size), size, config.model.patch_size)
  if params is None:
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params = whole.init(jax.random.PRNGKey(config.seed), images)["params"]
  return jax.device_put(blocks_up_to(params, encoder.depth), sharding.replicated(mesh))


def blocks_up_to(params: dict, depth: int) -> dict:
  """Encoder parameters without the blocks after `depth` (block_{depth}, ... dropped)."""
  return {k: v for k, v in params.items()
          if not (k.startswith("block_") and int(k.split("_")[1]) >= depth)}
