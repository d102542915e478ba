"""model.attention_impl = "auto": per platform, never what the platform refuses, for every
config and variant; cuDNN's rules against jax's own checks."""

import jax
import jax.numpy as jnp
import pytest
from helpers import config_variants, load
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks  # jax's, not ours
from repo_paths import repo_path

from ddae_jax import config_attention, config_lib
from ddae_jax.evaluation import config as eval_config
from ddae_jax.models import attention

CUDNN_VERSION = 90800  # any cuDNN 9 that jax supports; the checks below do not depend on it


def _jax_refuses_cudnn(call: attention.Call, dtype: str) -> str | None:
  """What jax.nn.dot_product_attention(implementation="cudnn") itself says of the call:
  its whole path traced on abstract [B, T, heads, d] arrays (jax.eval_shape; the gradient
  too when the call is trained), so every check jax runs on the way (check_layout,
  check_is_flash_attention in the forward rule, ...) runs with the arguments jax gives it.
  Only the cuDNN version lookup is stubbed (a CPU has none); on a CPU the checks assume a
  GPU before Hopper (head dimensions up to 128). An H200 with jax 0.11.2 and cuDNN 9.19
  answered the same for every case of launch/cudnn_probe.py (docs/decisions.md)."""
  x = jax.ShapeDtypeStruct((2, call.tokens, 4, call.head_dim), jnp.dtype(dtype))
  bias = jax.ShapeDtypeStruct((1, 4, call.tokens, call.tokens), x.dtype) if call.bias else None

  def loss(q, b):
    out = jax.nn.dot_product_attention(q, q, q, bias=b, implementation="cudnn")
    return out.astype(jnp.float32).sum()

  stub = pytest.MonkeyPatch()
  stub.setattr(cudnn_checks, "check_cudnn_version", lambda: CUDNN_VERSION)
  try:
    jax.eval_shape(jax.grad(loss) if call.trained else loss, x, bias)
  except (NotImplementedError, ValueError, TypeError) as err:
    return f"{type(err).__name__}: {err}"
  finally:
    stub.undo()
  return None


@pytest.mark.parametrize("tokens", [17, 50, 196, 197])
@pytest.mark.parametrize("head_dim", [12, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("bias,trained", [(False, False), (False, True), (True, False),
                                          (True, True)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cudnn_refusals_equal_jax_checks(tokens, head_dim, bias, trained, dtype):
  call = attention.Call(tokens, head_dim, bias, trained)
  ours, jax_says = attention.refusal("cudnn", call, dtype), _jax_refuses_cudnn(call, dtype)
  assert (ours is None) == (jax_says is None), (ours, jax_says)


def _cases():
  for path, variant, _, name in config_variants():
    for platform in ("gpu", "tpu", "cpu"):
      yield pytest.param(path, variant, platform, id=f"{name}-{platform}")


@pytest.mark.parametrize("path,variant,platform", list(_cases()))
def test_auto_never_picks_what_the_platform_refuses(path, variant, platform):
  """Every shipped config and variant, for GPU, TPU and CPU targets: the choice takes
  every attention call of the run (jax's own checks for cuDNN), and falls back to XLA only
  when cuDNN refuses one."""
  config = load(path, variant)
  config.model.attention_impl = "auto"
  impl = config_attention.attention_impl(config, platform)
  calls = config_attention.attention_calls(config)
  dtype = config.model.dtype
  evaluation = "protocol" in config
  assert calls
  if platform == "cpu":
    assert impl == "xla"
  elif platform == "tpu":
    # The kernel needs the pretraining step's mesh; the evaluation binaries refuse it.
    assert impl == ("xla" if evaluation else "pallas_short")
  else:
    refused = [r for r in (_jax_refuses_cudnn(c, dtype) for c in calls) if r]
    assert impl == ("xla" if refused else "cudnn"), refused
  # No call of the run is refused by what was picked.
  assert all(attention.refusal(impl, c, dtype) is None for c in calls)


def test_odd_lengths_in_training_fall_back_to_xla_on_gpus():
  """jax refuses cuDNN attention in training at an odd sequence length, bias or not ("Unsupported
  sequence length Q 197, KV 197": its cudnn_dot_product_attention passes a zeros(0)
  placeholder for a missing bias, and the forward rule's check counts it as a bias). Every
  shipped pretraining config differentiates attention over 1 + 196 tokens (the decoders,
  BEiT-v2's student, fine-tuning's classifier), so "auto" takes XLA there on GPUs; the
  frozen-encoder protocols (not trained) keep cuDNN."""
  beit = load(repo_path("configs/beitv2_vitb.py"))
  assert attention.Call(197, 64, True, True) in config_attention.attention_calls(beit)
  assert attention.refusal("cudnn", attention.Call(197, 64, False, True), "bfloat16")
  assert attention.refusal("cudnn", attention.Call(197, 64, False, False), "bfloat16") is None
  assert attention.refusal("cudnn", attention.Call(50, 64, True, True), "bfloat16") is None
  for path in ("configs/beitv2_vitb.py", "configs/vitb.py", "configs/mae_vitb.py",
               "configs/finetune_vitb.py"):
    assert config_attention.attention_impl(load(repo_path(path)), "gpu") == "xla", path
  for path in ("configs/linear_probe_vitb.py", "configs/knn_vitb.py"):
    assert config_attention.attention_impl(load(repo_path(path)), "gpu") == "cudnn", path


def test_calls_follow_the_steps_shapes():
  """DDAE ViT-B: the encoder's 1 + 49 visible tokens, the momentum encoder (no gradient) and
  both decoders at 1 + 196 (the pixel decoder's heads of 512 / 16 = 32); fine-tuning
  differentiates the classifier, linear probing does not."""
  assert set(config_attention.attention_calls(load(repo_path("configs/vitb.py")))) == {
      attention.Call(50, 64, False, True), attention.Call(197, 32, False, True),
      attention.Call(197, 64, False, False), attention.Call(197, 64, False, True)}
  assert config_attention.attention_calls(eval_config.finetune_config("base")) == (
      attention.Call(197, 64, False, True),)
  assert config_attention.attention_calls(eval_config.linear_probe_config("base")) == (
      attention.Call(197, 64, False, False),)


def test_forced_choices_are_kept_and_the_evaluation_binaries_refuse_pallas():
  c = config_lib.base_config()
  assert c.model.attention_impl == "auto" and c.model.dtype == "bfloat16"
  assert eval_config.finetune_config("base").model.attention_impl == "auto"
  assert config_attention.attention_impl(c) == "xla"  # these tests run on CPUs
  c.model.dtype = "float32"
  assert config_attention.attention_impl(c, "gpu") == "xla"  # cuDNN has no float32 kernel
  for forced, impl in (("", None), ("xla", "xla"), ("cudnn", "cudnn"), ("pallas", "pallas"),
                       ("pallas_short", "pallas_short")):
    c.model.attention_impl = forced
    assert config_attention.attention_impl(c, "tpu") == impl
  # The Pallas kernels run under the pretraining step's mesh only.
  for forced in ("pallas", "pallas_short"):
    e = eval_config.finetune_config("base")
    e.model.attention_impl = forced
    with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
      eval_config.check(e)
