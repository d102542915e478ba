"""Attention over short sequences as one Pallas TPU kernel per pass: logits never leave the chip.

At the lengths DDAE runs (the encoder's 1 + 49 tokens, the momentum encoder's and the
decoders' 1 + 196) a head's whole [T, T] block of logits fits in a TPU core's vector
memory (256 x 256 float32 is 256 KB), so the forward kernel computes q k^T, the softmax
and the product with v in one pass and writes only the output, and the backward kernel
recomputes the probabilities from q and k instead of reading [T, T] tensors back.
XLA's path (attention.py, "xla") writes the logits, the probabilities and their
gradients to HBM between its products.

Layout: the kernels read timm's fused qkv projection as it is, [B, T, 3 x heads x d]
([q | k | v], the heads inside each), and write [B, T, heads x d], the layout the output
projection reads (the backward: d qkv in the projection's layout). A grid step holds
whole images (images_per_step of them) with all their heads, so a block spans every
lane of the projection and no transpose of q, k or v reaches HBM; inside, each head is
a static lane slice. A head's logits are [T, T] with the keys on the lanes; Mosaic pads
T to its (8, 128) tiles on the chip, and nothing is padded in HBM, so nothing is masked.

Precision: the products take the inputs' dtype and accumulate in float32; the logits and
the softmax are float32; the probabilities (and, in the backward, the logits' gradient)
return to the inputs' dtype before their products, as in jax's flash kernels; the output
is divided by the row sums after the product with v. In float32 all of it is float32.

The backward saves no row statistics: it recomputes the row maximum and sum as the
forward did (two [T, T] reductions on the chip against a [B, heads, T] float32 array
written and read), and takes the softmax's row term sum_j p_ij dp_ij from p and dp
rather than reading the output back (it equals do_i . o_i). Its residuals are qkv and
the bias.

`bias` (BEiT-v2's relative position bias, shared: [1, heads, T, T], or per image [B,
heads, T, T]) is added to the scaled logits; a shared bias is fetched once per call and
its gradient summed over the batch on the chip in float32. Each kernel declares its
FLOPs, exponentials and bytes to the compiler (pl.CostEstimate), so `python -m
ddae_jax.aot` counts them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The longest sequence the kernel takes: one head's float32 logits, probabilities and
# their gradient must fit in vector memory beside the blocks (3 x 512 x 512 x 4 B = 3 MB).
MAX_TOKENS = 512
# Images per grid step: enough rows that a step's fixed cost is shared by several images
# when sequences are short (the encoder's 50 tokens), one image at 197.
ROWS_PER_STEP = 256


def check_shapes(qkv_shape, heads: int, bias_shape=None) -> None:
  """Raises ValueError naming model.attention_impl when the kernel cannot take the shapes."""
  _, t, width = qkv_shape
  if t > MAX_TOKENS:
    raise ValueError(f"model.attention_impl='pallas_short' takes sequences of at most "
                     f"{MAX_TOKENS} tokens, got {t}")
  if width % (3 * heads):
    raise ValueError(f"model.attention_impl='pallas_short': qkv's last axis {width} is not "
                     f"3 x heads ({heads}) x head_dim")
  if bias_shape is not None and (len(bias_shape) != 4 or tuple(bias_shape[1:]) != (heads, t, t)):
    raise ValueError(f"model.attention_impl='pallas_short': bias must be [B or 1, {heads}, "
                     f"{t}, {t}], got {list(bias_shape)}")


# ----------------------------------------------------------------------------- kernels
def _probabilities(q, k, bias, scale):
  """exp(logits - row max) of one head's scaled logits, float32[T, T], and its row sums."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
  return p, jnp.sum(p, axis=1, keepdims=True)


def _heads(ref, i, heads, head_dim, parts):
  """Per head, its (q, k, v, ...) column slices of image i of a [images, T, parts x W] ref."""
  width = heads * head_dim
  for h in range(heads):
    yield h, [ref[i, :, pl.ds(p * width + h * head_dim, head_dim)] for p in range(parts)]


def _forward_kernel(*refs, heads, head_dim, has_bias):
  qkv_ref, o_ref = refs[0], refs[-1]
  bias_ref = refs[1] if has_bias else None
  scale = head_dim ** -0.5

  def image(i, carry):
    for h, (q, k, v) in _heads(qkv_ref, i, heads, head_dim, 3):
      bias = None if bias_ref is None else bias_ref[i if bias_ref.shape[0] > 1 else 0, h]
      p, row_sum = _probabilities(q, k, bias, scale)
      o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      o_ref[i, :, pl.ds(h * head_dim, head_dim)] = (o / row_sum).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, qkv_ref.shape[0], image, 0)


def _backward_kernel(*refs, heads, head_dim, has_bias, accumulate_bias):
  if has_bias:
    qkv_ref, do_ref, bias_ref, dqkv_ref, dbias_ref = refs
  else:
    (qkv_ref, do_ref, dqkv_ref), bias_ref = refs, None
  scale, width = head_dim ** -0.5, heads * head_dim
  if accumulate_bias:
    @pl.when(pl.program_id(0) == 0)
    def _():
      dbias_ref[...] = jnp.zeros_like(dbias_ref)

  def image(i, carry):
    bias_image = i if has_bias and bias_ref.shape[0] > 1 else 0
    for h, (q, k, v) in _heads(qkv_ref, i, heads, head_dim, 3):
      do = do_ref[i, :, pl.ds(h * head_dim, head_dim)]
      p, row_sum = _probabilities(q, k, None if bias_ref is None else bias_ref[bias_image, h],
                                  scale)
      p = p / row_sum
      contract_rows = (((0,), (0,)), ((), ()))
      dv = jax.lax.dot_general(p.astype(do.dtype), do, contract_rows,
                               preferred_element_type=jnp.float32)
      dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
      # The softmax's row term: sum_j p_ij dp_ij, which equals do_i . o_i.
      ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))  # d logits, float32[T, T]
      if bias_ref is not None:
        if accumulate_bias:
          dbias_ref[0, h] += ds
        else:
          dbias_ref[bias_image, h] = ds.astype(dbias_ref.dtype)
      ds = (ds * scale).astype(q.dtype)
      dq = jnp.dot(ds, k, preferred_element_type=jnp.float32)
      dk = jax.lax.dot_general(ds, q, contract_rows, preferred_element_type=jnp.float32)
      for part, grad in enumerate((dq, dk, dv)):
        dqkv_ref[i, :, pl.ds(part * width + h * head_dim, head_dim)] = grad.astype(
            dqkv_ref.dtype)
    return carry

  jax.lax.fori_loop(0, qkv_ref.shape[0], image, 0)


# ------------------------------------------------------------------------ pallas_calls
def images_per_step(batch: int, tokens: int) -> int:
  """The largest divisor of `batch` whose images hold at most ROWS_PER_STEP tokens (>= 1)."""
  return max(n for n in range(1, batch + 1)
             if batch % n == 0 and (n == 1 or n * tokens <= ROWS_PER_STEP))


def _blocks(shape, bias_shape):
  """(grid, BlockSpec of a [B, T, X] array, of the bias): a grid step holds whole images."""
  b, t, _ = shape
  n = images_per_step(b, t)
  token_block = lambda x: pl.BlockSpec((n, t, x), lambda i: (i, 0, 0))
  bias_block = None
  if bias_shape is not None:
    if bias_shape[0] == 1:  # shared: fetched once, its block never changes
      bias_block = pl.BlockSpec((1,) + tuple(bias_shape[1:]), lambda i: (0, 0, 0, 0))
    else:
      bias_block = pl.BlockSpec((n,) + tuple(bias_shape[1:]), lambda i: (i, 0, 0, 0))
  return (b // n,), token_block, bias_block


def _compiler_params(accumulate: bool):
  # The batch axis accumulates a shared bias's gradient: it runs in order then.
  # (jax < 0.6.2 names the class TPUCompilerParams.)
  params = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
  return params(dimension_semantics=("arbitrary" if accumulate else "parallel",))


def _nbytes(*arrays) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in arrays)


def _forward(qkv, bias, heads):
  b, t, width3 = qkv.shape
  width = width3 // 3
  d = width // heads
  grid, token_block, bias_block = _blocks(qkv.shape, None if bias is None else bias.shape)
  inputs = [qkv] + ([] if bias is None else [bias])
  out = jax.ShapeDtypeStruct((b, t, width), qkv.dtype)
  kernel = functools.partial(_forward_kernel, heads=heads, head_dim=d, has_bias=bias is not None)
  cost = pl.CostEstimate(flops=4 * b * heads * t * t * d, transcendentals=b * heads * t * t,
                         bytes_accessed=_nbytes(*inputs) + _nbytes(out))
  return pl.pallas_call(
      kernel, out_shape=out, grid=grid,
      in_specs=[token_block(width3)] + ([] if bias is None else [bias_block]),
      out_specs=token_block(width), cost_estimate=cost,
      compiler_params=_compiler_params(False), name="short_attention_fwd")(*inputs)


def _backward(qkv, bias, heads, do):
  b, t, width3 = qkv.shape
  width = width3 // 3
  d = width // heads
  grid, token_block, bias_block = _blocks(qkv.shape, None if bias is None else bias.shape)
  # A shared bias's gradient sums over every image, in the kernel.
  accumulate = bias is not None and bias.shape[0] == 1
  inputs = [qkv, do] + ([] if bias is None else [bias])
  outs = [jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)]
  out_specs = [token_block(width3)]
  if bias is not None:
    outs.append(jax.ShapeDtypeStruct(bias.shape, jnp.float32 if accumulate else bias.dtype))
    out_specs.append(bias_block)
  kernel = functools.partial(_backward_kernel, heads=heads, head_dim=d,
                             has_bias=bias is not None, accumulate_bias=accumulate)
  # Recomputed q k^T, then p^T do, do v^T, ds k and ds^T q: five products of 2 T^2 d.
  cost = pl.CostEstimate(flops=10 * b * heads * t * t * d, transcendentals=b * heads * t * t,
                         bytes_accessed=_nbytes(*inputs) + _nbytes(*outs))
  grads = pl.pallas_call(
      kernel, out_shape=outs, grid=grid,
      in_specs=[token_block(width3), token_block(width)] + ([] if bias is None else [bias_block]),
      out_specs=out_specs, cost_estimate=cost, compiler_params=_compiler_params(accumulate),
      name="short_attention_bwd")(*inputs)
  return grads[0], (grads[1].astype(bias.dtype) if bias is not None else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def attention_qkv(qkv, bias, heads: int):
  """softmax(q k^T / sqrt(d) + bias) v, all heads, from timm's fused qkv, one kernel a pass.

  Args:
    qkv: [B, T, 3 x heads x d], [q | k | v] with the heads inside each (timm's qkv
      projection's output), T <= MAX_TOKENS.
    bias: None or [B or 1, heads, T, T], added to the scaled logits.
    heads: the number of heads.

  Returns:
    [B, T, heads x d] in qkv's dtype.
  """
  check_shapes(qkv.shape, heads, None if bias is None else bias.shape)
  return _forward(qkv, bias, heads)


def _fwd(qkv, bias, heads):
  return attention_qkv(qkv, bias, heads), (qkv, bias)


def _bwd(heads, residuals, do):
  qkv, bias = residuals
  return _backward(qkv, bias, heads, do)


attention_qkv.defvjp(_fwd, _bwd)


def short_attention(q, k, v, bias=None):
  """attention_qkv on separate q, k, v: [B, T, heads, d] each (one concatenation)."""
  b, t, h, d = q.shape
  qkv = jnp.concatenate([x.reshape(b, t, h * d) for x in (q, k, v)], axis=-1)
  return attention_qkv(qkv, bias, h).reshape(b, t, h, d)
