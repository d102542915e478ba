"""Scaled dot-product attention, one function for every implementation the model offers.

`attend(q, k, v, bias, impl)` takes timm's [B, T, heads, head_dim] layout and
dispatches on `impl` (config_attention.attention_impl resolves model.attention_impl
for the target platform and the run's shapes; `refusal` says what cuDNN refuses);
`attend_qkv(qkv, heads, bias, impl)` takes the fused qkv projection the model makes:

  "xla"     XLA, written out: the logits leave the q k^T product in the compute
            dtype, the softmax runs in float32 and the probabilities go back to
            the compute dtype for the product with v. This is PyTorch
            autocast's precision (its matmuls return 16-bit logits, its softmax
            is on the float32 list), i.e. what MAE and BootMAE train with, and
            it halves the [B, heads, T, T] tensors XLA writes to HBM: the TPU
            compiler counts 14-17% fewer bytes per decoder block than with
            float32 logits (BENCHMARKS.md). In float32 it is plain attention.
  "" / None jax.nn.dot_product_attention's XLA path: float32 logits and softmax.
  "cudnn"   cuDNN's fused kernel (GPUs, 16-bit dtypes).
  "pallas_short"  TPU, pretraining only: models/short_attention.py's kernels for
            sequences of at most short_attention.MAX_TOKENS, "xla" for longer
            ones. One kernel per pass holds a head's whole [T, T] block on the
            chip, reads timm's fused qkv as it is and writes only the output
            (the backward: d qkv); the TPU compiler counts 37-51% fewer bytes
            per block than "xla" for DDAE ViT-B (BENCHMARKS.md), and "auto"
            picks it on TPUs. Same precision as "xla", bar the logits, which
            stay float32.
  "pallas"  TPU, pretraining only: the Pallas flash-attention kernel
            (jax.experimental.pallas.ops.tpu.flash_attention) for sequences of
            at least FLASH_MIN_TOKENS, "xla" for shorter ones. The kernel never
            writes the [T, T] logits to HBM, but it pads T to its 128-token
            tiles and keeps float32 softmax statistics broadcast over 128 lanes
            for the backward pass; the TPU compiler counts more bytes for it
            than for "xla" on DDAE and MAE (BENCHMARKS.md). Padded keys are
            masked out with segment ids.

Why the threshold: DDAE's encoder sees 1 + 49 tokens, its momentum encoder and
decoders 1 + 196; a 50-token sequence would be padded 2.6x to fill one tile.
The Pallas kernels run per device under shard_map over the step's batch axes
(kernel_mesh): XLA cannot partition a Mosaic call.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ddae_jax.models import short_attention

FLASH_MIN_TOKENS = 128
FLASH_BLOCK = 128  # the kernel's tile along both sequence axes

# What cuDNN's fused attention takes in 16-bit: jax's check_layout and
# check_is_flash_attention (jax/_src/cudnn/fused_attention_stablehlo.py) as
# jax.nn.dot_product_attention reaches them (the same in jax 0.10.2 and 0.11.2; an H200
# with jax 0.11.2 refused exactly these, launch/cudnn_probe.py). Head dimensions up to
# 256 pass on Hopper and later; 128 passes on every GPU.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Call:
  """One attention call of a step, as far as an implementation may refuse it."""
  tokens: int       # sequence length (queries = keys)
  head_dim: int
  bias: bool        # an additive bias on the logits
  trained: bool     # differentiated: its backward pass runs


def refusal(impl: str | None, call: Call, dtype: str) -> str | None:
  """Why `impl` cannot run `call` in `dtype` ("bfloat16", ...), or None when it can.

  Only cuDNN refuses shapes; the Pallas options fall back to "xla" outside their
  lengths (FLASH_MIN_TOKENS, short_attention.MAX_TOKENS), and XLA takes anything.
  """
  if impl != "cudnn":
    return None
  if dtype not in CUDNN_DTYPES:
    return f"cuDNN's fused attention takes {CUDNN_DTYPES}, not {dtype}"
  if call.head_dim % 8 or call.head_dim > CUDNN_MAX_HEAD_DIM:
    return (f"cuDNN takes head dimensions that are multiples of 8 up to "
            f"{CUDNN_MAX_HEAD_DIM}, not {call.head_dim}")
  if call.trained and call.tokens % 2:
    # Bias or not: cudnn_dot_product_attention hands the forward rule a zeros(0)
    # placeholder for a missing bias, which its check counts as a bias.
    return (f"jax refuses cuDNN attention in training at an odd sequence length "
            f"(Q {call.tokens}, KV {call.tokens})")
  return None


# (mesh, batch axes) of the step being traced: XLA cannot partition a Mosaic
# kernel, so the flash path runs it per device under shard_map.
_KERNEL_MESH: list = []


@contextlib.contextmanager
def kernel_mesh(mesh, batch_axes):
  """Traces the enclosed code with Pallas kernels split over `batch_axes` of `mesh`."""
  _KERNEL_MESH.append((mesh, tuple(batch_axes)))
  try:
    yield
  finally:
    _KERNEL_MESH.pop()


def _xla(q, k, v, bias):
  """softmax in float32 between products whose results stay in q's dtype."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=q.dtype)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(q.dtype).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=q.dtype)


def _flash(q, k, v, bias):
  """Pallas flash attention on [B, T, heads, d] tensors, T padded to FLASH_BLOCK."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU-only kernel

  b, t, h, d = q.shape
  padded = -(-t // FLASH_BLOCK) * FLASH_BLOCK
  # The kernel adds the bias before it scales the logits: scale q instead.
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  # Its layout is [B, heads, T, d].
  q, k, v = (jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, padded - t), (0, 0)))
             for x in (q, k, v))
  segments = None
  if padded != t:
    # Real tokens are segment 1, padding 0; a query attends only to keys of its
    # own segment, so no real query sees a padded key.
    ids = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32), (b, padded))
    segments = fa.SegmentIds(q=ids, kv=ids)
  if bias is not None:
    bias = jnp.broadcast_to(bias.astype(jnp.float32), (b, h, t, t))
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, padded - t), (0, padded - t)))
  out = fa.flash_attention(q, k, v, ab=bias, segment_ids=segments, sm_scale=1.0)
  return jnp.swapaxes(out[:, :, :t], 1, 2)


def _per_device(kernel, arrays, bias):
  """`kernel(*arrays, bias)` on each device's share of the batch under the traced step's
  mesh (kernel_mesh), or as is outside one."""
  if not _KERNEL_MESH:
    return kernel(*arrays, bias)  # one device
  mesh, axes = _KERNEL_MESH[-1]
  split = P(axes)
  if bias is None:
    return jax.shard_map(lambda *a: kernel(*a, None), mesh=mesh,
                         in_specs=(split,) * len(arrays), out_specs=split,
                         check_vma=False)(*arrays)
  # A shared bias is replicated; shard_map's transpose sums its per-device gradients.
  bias_spec = P() if bias.shape[0] == 1 else split
  return jax.shard_map(kernel, mesh=mesh, in_specs=(split,) * len(arrays) + (bias_spec,),
                       out_specs=split, check_vma=False)(*arrays, bias)


def attend_qkv(qkv, heads: int, bias=None, impl: str | None = "xla"):
  """attend() on timm's fused qkv projection, [B, T, 3 x heads x d] ([q | k | v]).

  "pallas_short" reads the projection as it is and returns [B, T, heads x d] (the
  layout the output projection takes); the others split it into q, k and v first.
  """
  b, t, width = qkv.shape
  if impl == "pallas_short" and t <= short_attention.MAX_TOKENS:
    bias = None if bias is None else bias.astype(qkv.dtype)  # the "xla" path's rounding
    return _per_device(lambda qkv, bias: short_attention.attention_qkv(qkv, bias, heads),
                       (qkv,), bias)
  q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, heads, width // (3 * heads)), 2, 0)
  return attend(q, k, v, bias, impl).reshape(b, t, width // 3)


def attend(q, k, v, bias=None, impl: str | None = "xla"):
  """softmax(q k^T / sqrt(d) + bias) v.

  Args:
    q, k, v: [B, T, heads, head_dim], the compute dtype.
    bias: None or logits added before the softmax, [B or 1, heads, T, T].
    impl: "xla", "" / None, "cudnn", "pallas" or "pallas_short" (module docstring).

  Returns:
    [B, T, heads, head_dim].
  """
  if impl == "pallas_short":
    if q.shape[1] <= short_attention.MAX_TOKENS:
      bias = None if bias is None else bias.astype(q.dtype)  # the "xla" path's rounding
      return _per_device(short_attention.short_attention, (q, k, v), bias)
    impl = "xla"
  if impl == "pallas":
    if q.shape[1] >= FLASH_MIN_TOKENS:
      return _per_device(_flash, (q, k, v), bias)
    impl = "xla"
  if impl == "xla":
    return _xla(q, k, v, bias)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl or None)
