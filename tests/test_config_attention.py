"""model.attention_impl = "auto": per platform, never what the platform refuses, for every
config and variant; cuDNN's rules against jax's own checks."""

import jax
import jax.numpy as jnp
import pytest
from config_files import config_variants, load
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks  # jax's, not ours
from repo_paths import repo_path

from ddae_jax import config_attention, config_lib
from ddae_jax.evaluation import config as eval_config
from ddae_jax.models import attention

CUDNN_VERSION = 90800  # any cuDNN 9 that jax supports; the checks below do not depend on it


def _jax_refuses_cudnn(call: attention.Call, dtype: str) -> str | None:
  """jax's own checks for cuDNN attention (check_layout, check_is_flash_attention) on
  abstract [B, T, heads, d] arrays, as jax.nn.dot_product_attention(implementation="cudnn")
  runs them; on a CPU they assume a GPU before Hopper (head dimensions up to 128)."""
  x = jax.ShapeDtypeStruct((2, call.tokens, 4, call.head_dim), jnp.dtype(dtype))
  bias = jax.ShapeDtypeStruct((1, 4, call.tokens, call.tokens), x.dtype) if call.bias else None
  layout = cudnn_checks.AttentionLayout.BTNH
  try:
    cudnn_checks.check_layout(x, x, x, bias, None, None, None, None, None, None, layout)
    cudnn_checks.check_is_flash_attention(x, x, x, layout.value, CUDNN_VERSION, call.bias,
                                          call.trained)
  except NotImplementedError as err:
    return str(err)
  return None


@pytest.mark.parametrize("tokens", [50, 196, 197])
@pytest.mark.parametrize("head_dim", [12, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("bias,trained", [(False, True), (True, False), (True, True)])
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


def test_beitv2_falls_back_to_xla_on_gpus():
  """Its student trains a shared relative position bias over 1 + 196 tokens: jax refuses
  cuDNN for it ("Unsupported sequence length Q 197, KV 197"), so "auto" takes XLA there; DDAE
  ViT-B (no bias) keeps cuDNN."""
  beit = load(repo_path("configs/beitv2_vitb.py"))
  assert attention.Call(197, 64, True, True) in config_attention.attention_calls(beit)
  assert config_attention.attention_impl(beit, "gpu") == "xla"
  assert config_attention.attention_impl(load(repo_path("configs/vitb.py")), "gpu") == "cudnn"


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
