"""models/short_attention.py's Pallas TPU kernels, run by Pallas's interpreter on the CPU,
against jax.nn.dot_product_attention: outputs and the gradients of q, k, v and the bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddae_jax.models import short_attention as sa

# Largest error over the largest reference value. float32: the kernels reorder sums
# (the softmax's normalisation after the product with v, the row term from p and dp), a
# few float32 ulps. bfloat16: one bfloat16 ulp (2^-7) at the largest value, and at most
# half an ulp (2^-8) above what jax.nn.dot_product_attention itself gets wrong in
# bfloat16 (both round their results to bfloat16; the kernels also round the
# probabilities and the logits' gradient to bfloat16 before their products).
FLOAT32_TOL = 2e-6
BFLOAT16_TOL = 2.0 ** -7


def _inputs(b, t, h, d, dtype, bias_batch, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(key, (b, t, h, d)).astype(dtype) for key in keys[:3])
  bias = None
  if bias_batch:
    bias = jax.random.normal(keys[3], (bias_batch, h, t, t)).astype(dtype)
  cotangent = jax.random.normal(keys[4], (b, t, h, d))  # the loss's gradient wrt the output
  return (q, k, v, bias), cotangent


def _value_and_grads(attention, args, cotangent, cast=lambda x: x):
  """[output, d q, d k, d v (, d bias)] of sum(attention(...) * cotangent)."""
  def loss(*a):
    out = attention(*(None if x is None else cast(x) for x in a))
    return jnp.sum(out.astype(jnp.float32) * cotangent)
  diff = tuple(i for i, x in enumerate(args) if x is not None)
  out = attention(*(None if x is None else cast(x) for x in args))
  return [out, *jax.grad(loss, argnums=diff)(*args)]


def _jax_attention(q, k, v, bias):
  return jax.nn.dot_product_attention(q, k, v, bias=bias)


def _error(ours, ref):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


# (images, tokens, heads, head_dim, dtype, bias: None, 1 (shared) or per image):
# the encoder's 50 tokens (several images per grid step), the decoders' 197, ViT-L/14's
# 257; head dimensions of the pixel decoder (32), ViT-B (64) and 128.
CASES = [
    (3, 50, 4, 32, jnp.float32, None),
    (2, 50, 2, 64, jnp.bfloat16, 2),
    (2, 197, 2, 64, jnp.bfloat16, 1),
    (2, 197, 4, 32, jnp.bfloat16, None),
    (2, 197, 2, 64, jnp.float32, 1),
    (2, 257, 2, 128, jnp.float32, 2),
    (1, 257, 2, 64, jnp.bfloat16, 1),
]


@pytest.mark.parametrize("b,t,h,d,dtype,bias_batch", CASES)
def test_kernels_equal_jax_attention(interpreted_kernels, b, t, h, d, dtype, bias_batch):
  args, cotangent = _inputs(b, t, h, d, dtype, bias_batch)
  ours = _value_and_grads(sa.short_attention, args, cotangent)
  # The reference: float32 attention on the same (rounded) inputs.
  ref = _value_and_grads(_jax_attention, args, cotangent, lambda x: x.astype(jnp.float32))
  assert all(x.dtype == dtype for x in ours) and len(ours) == len(ref) == (4 + bool(bias_batch))
  names = ["out", "dq", "dk", "dv", "dbias"]
  if dtype == jnp.float32:
    for name, a, r in zip(names, ours, ref, strict=False):
      assert _error(a, r) < FLOAT32_TOL, name
    return
  jax_16 = _value_and_grads(_jax_attention, args, cotangent)
  for name, a, r, j in zip(names, ours, ref, jax_16, strict=False):
    assert _error(a, r) < BFLOAT16_TOL, name
    assert _error(a, r) <= _error(j, r) + 2.0 ** -8, name


def test_fused_qkv_equals_split_heads(interpreted_kernels):
  """attention_qkv reads timm's [B, T, 3 x heads x d] projection ([q | k | v], heads
  inside each) as attend_qkv's other paths split it."""
  b, t, h, d = 2, 50, 3, 16
  qkv = jax.random.normal(jax.random.key(1), (b, t, 3 * h * d))
  q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, h, d), 2, 0)
  np.testing.assert_allclose(sa.attention_qkv(qkv, None, h),
                             _jax_attention(q, k, v, None).reshape(b, t, h * d), atol=2e-6)


def test_images_per_step_fill_rows_and_divide_the_batch():
  assert sa.images_per_step(64, 50) == 4  # 200 rows of at most 256
  assert sa.images_per_step(256, 197) == 1
  assert sa.images_per_step(6, 50) == 3
  assert sa.images_per_step(7, 50) == 1  # 7 is prime


@pytest.mark.parametrize("shape,bias_shape,match", [
    ((2, 513, 3 * 64), None, "at most 512 tokens"),
    ((2, 50, 3 * 64 + 1), None, "3 x heads"),
    ((2, 50, 3 * 64), (1, 2, 50, 49), r"bias must be \[B or 1, 2, 50, 50\]"),
])
def test_shapes_it_cannot_take_are_refused(shape, bias_shape, match):
  with pytest.raises(ValueError, match=match):
    sa.check_shapes(shape, 2, bias_shape)
