"""Which attention implementation a config runs: model.attention_impl, "auto" resolved.

"auto" follows the platform the step compiles for (default: jax's default backend) and
picks only what that platform accepts for every attention call of the run
(`attention_calls`: each part's tokens, head dimension, bias, and whether it is
differentiated):

  GPU, 16-bit  "cudnn" when cuDNN's fused kernel takes every call
               (models.attention.refusal: head dimension, dtype, and no trained bias
               at an odd length), else "xla". BEiT-v2's student trains a shared
               relative position bias over 197 tokens, which jax refuses for cuDNN.
  TPU          "pallas_short" (models/short_attention.py) in pretraining: by the TPU
               compiler's count it moves fewer bytes than "xla" for every step and
               block shipped (BENCHMARKS.md). "xla" in the evaluation binaries, which
               do not trace their step under attention.kernel_mesh.
  otherwise    "xla" (logits in the compute dtype, softmax in float32).

A forced choice ("", "xla", "cudnn", "pallas", "pallas_short") is returned as is.
"""

from __future__ import annotations

import jax

from ddae_jax.models import attention
from ddae_jax.models.vit import VIT_SIZES
from ddae_jax.objectives.masking import num_masked

GPU_PLATFORMS = ("gpu", "cuda")


def _is_evaluation(config) -> bool:
  return "protocol" in config  # evaluation/config.py's configs


def attention_calls(config) -> tuple[attention.Call, ...]:
  """The distinct attention calls of the config's step (pretraining or evaluation)."""
  m = config.model
  width, _, heads = VIT_SIZES[m.size]
  rows = cols = m.image_size // m.patch_size
  n = rows * cols
  if _is_evaluation(config):
    # The classifier sees every patch; only fine-tuning differentiates it.
    return (attention.Call(n + 1, width // heads, False, config.protocol == "finetune"),)
  bias = bool(m.get("rel_pos_bias", False))
  if config.get("method", "ddae") == "beitv2":
    # The student sees every patch (mask tokens in place); its class-token head shares
    # the encoder's bias.
    return (attention.Call(n + 1, width // heads, bias, True),)
  calls = [attention.Call(n - num_masked(config.masking.ratio, (rows, cols)) + 1,
                          width // heads, bias, True)]
  if config.pixel.enabled:
    p = config.pixel
    calls.append(attention.Call(n + 1, p.decoder_width // p.decoder_heads, False, True))
  if config.distill.enabled:
    calls.append(attention.Call(n + 1, width // heads, bias, False))  # momentum encoder
    calls.append(attention.Call(n + 1, width // heads, False, True))  # its decoder
  return tuple(dict.fromkeys(calls))


def attention_impl(config, platform: str | None = None) -> str | None:
  """models.attention.attend's `impl` for config.model.attention_impl on `platform`."""
  impl = config.model.attention_impl
  if impl != "auto":
    return impl or None
  platform = platform or jax.default_backend()
  if platform in GPU_PLATFORMS:
    dtype = config.model.dtype
    if all(attention.refusal("cudnn", call, dtype) is None for call in attention_calls(config)):
      return "cudnn"
    return "xla"
  if platform == "tpu" and not _is_evaluation(config):
    return "pallas_short"
  return "xla"
