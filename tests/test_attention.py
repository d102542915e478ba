"""models/attention.py against jax.nn.dot_product_attention: the XLA path's numbers and
precision, the Pallas flash path and the short-sequence kernels under the step's mesh (run
by Pallas's interpreter on the CPU), the fused-qkv entry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ddae_jax.models import attention, short_attention


def _qkv(t, b=2, h=3, d=16, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.float32).astype(dtype) for key in keys[:3])
  bias = jax.random.normal(keys[3], (1, h, t, t), jnp.float32)
  return q, k, v, bias


def _reference(q, k, v, bias=None):
  return jax.nn.dot_product_attention(q, k, v, bias=bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_xla_path_equals_jax_attention_in_float32(with_bias):
  q, k, v, bias = _qkv(50)
  bias = bias if with_bias else None
  np.testing.assert_allclose(attention.attend(q, k, v, bias, "xla"), _reference(q, k, v, bias),
                             atol=2e-6)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a, bias) ** 2), argnums=(0, 1, 2))(q, k, v)
           for f in (functools.partial(attention.attend, impl="xla"), _reference)]
  for ours, ref in zip(*grads, strict=True):
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_xla_path_keeps_16_bit_logits_and_a_float32_softmax():
  """PyTorch autocast's precision: the [B, heads, T, T] product returns bfloat16, the
  softmax's exp runs in float32; the result stays close to float32 attention."""
  q, k, v, _ = _qkv(197, dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(functools.partial(attention.attend, impl="xla"))(q, k, v).jaxpr
  eqns = list(_all_eqns(jaxpr))
  square = [e for e in eqns if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape == (2, 3, 197, 197)]
  assert len(square) == 1 and square[0].outvars[0].aval.dtype == jnp.bfloat16
  exps = [e.outvars[0].aval for e in eqns if e.primitive.name == "exp"]
  assert exps and all(a.dtype == jnp.float32 and a.shape == (2, 3, 197, 197) for a in exps)
  out = attention.attend(q, k, v, None, "xla")
  assert out.dtype == jnp.bfloat16
  exact = _reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  # bfloat16 keeps 8 bits of mantissa: outputs of size ~0.1-1 agree to ~1e-2.
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=3e-2)


def _all_eqns(jaxpr):
  """The equations of a jaxpr and of the jaxprs in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        yield from _all_eqns(inner)


@pytest.mark.parametrize("with_bias", [False, True])
def test_flash_path_pads_and_masks_to_plain_attention(interpreted_kernels, with_bias):
  """197 tokens (the decoders' length) padded to 256; padded keys never get weight."""
  q, k, v, bias = _qkv(197, b=1, h=2, d=32)
  bias = bias if with_bias else None
  out = attention.attend(q, k, v, bias, "pallas")
  np.testing.assert_allclose(out, _reference(q, k, v, bias), atol=1e-5)
  ours = jax.grad(lambda q, k, v: jnp.sum(attention.attend(q, k, v, bias, "pallas") ** 2),
                  argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(_reference(q, k, v, bias) ** 2),
                 argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_flash_path_runs_per_device_under_the_step_mesh(interpreted_kernels):
  """Inside kernel_mesh the kernel runs under shard_map over the batch axes (XLA cannot
  partition a Mosaic call); short sequences take the XLA path."""
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  q, k, v, bias = _qkv(130, b=4, h=2, d=32)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))

  def run(q, k, v):
    with attention.kernel_mesh(mesh, ("data", "fsdp")):
      return attention.attend(q, k, v, bias, "pallas")

  assert "sdy.manual_computation" in jax.jit(run).lower(q, k, v).as_text()  # a shard_map
  np.testing.assert_allclose(jax.jit(run)(q, k, v), _reference(q, k, v, bias), atol=1e-5)
  short = _qkv(attention.FLASH_MIN_TOKENS - 1)
  np.testing.assert_allclose(attention.attend(*short[:3], None, "pallas"),
                             attention.attend(*short[:3], None, "xla"), atol=0)


def test_short_kernel_runs_per_device_and_sums_the_shared_bias_gradient(interpreted_kernels):
  """"pallas_short" inside kernel_mesh: the kernels run under shard_map over the batch axes,
  each device sums its images' share of a shared bias's gradient and shard_map's transpose
  sums the devices' shares: values and all four gradients equal jax's attention."""
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  q, k, v, bias = _qkv(50, b=8, h=2, d=32)
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))

  def loss(attend, q, k, v, bias):
    return jnp.sum(attend(q, k, v, bias) * jnp.arange(32.0))

  def ours(q, k, v, bias):
    with attention.kernel_mesh(mesh, ("data", "fsdp")):
      return attention.attend(q, k, v, bias, "pallas_short")

  assert "sdy.manual_computation" in jax.jit(ours).lower(q, k, v, bias).as_text()
  np.testing.assert_allclose(jax.jit(ours)(q, k, v, bias), _reference(q, k, v, bias), atol=2e-6)
  grads = [jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2, 3)))(q, k, v, bias)
           for f in (ours, _reference)]
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("impl", ["xla", "", "pallas_short"])
def test_attend_qkv_reads_timms_fused_projection(interpreted_kernels, impl):
  """attend_qkv on [B, T, 3 x heads x d] ([q | k | v], heads inside each) equals attend on
  the split heads; "pallas_short" beyond short_attention.MAX_TOKENS takes the XLA path."""
  b, h, d = 2, 3, 16
  for t in (50, short_attention.MAX_TOKENS + 1):
    qkv = jax.random.normal(jax.random.key(t), (b, t, 3 * h * d))
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, h, d), 2, 0)
    if impl == "pallas_short" and t > short_attention.MAX_TOKENS:
      expected = attention.attend(q, k, v, None, "xla")
    else:
      expected = _reference(q, k, v)
    np.testing.assert_allclose(attention.attend_qkv(qkv, h, None, impl),
                               expected.reshape(b, t, h * d), atol=2e-6)
