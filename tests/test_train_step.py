"""The jitted, sharded train step: sharding invariance, no retrace, EMA, switches, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import retrace
from helpers import smooth_images, tiny

from ddae_jax import config_lib
from ddae_jax import train_step as ts
from ddae_jax.methods import schedules


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_one_device_equals_eight_device_mesh():
  c = tiny()
  c.optim.warmup_epochs = 0.0  # a real update from the first step
  images = smooth_images(16)
  results = {}
  for name, devices, mesh, rules in (
      ("one", jax.devices()[:1], (("data", -1), ("fsdp", 1)), ((".*", "replicate"),)),
      ("eight", jax.devices()[:8], (("data", 4), ("fsdp", 2)), ((".*", "fsdp"),))):
    c.sharding.mesh, c.sharding.rules = mesh, rules
    built = ts.build(c, devices)
    state = built.state
    losses = []
    for _ in range(3):
      state, metrics = built.step(state, {"image": images})
      losses.append(float(metrics["loss"]))
    results[name] = (losses, host(state))
  kernel = results["eight"][1]["params"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(results["one"][0], results["eight"][0], rtol=1e-5)
  flat_one = jax.tree_util.tree_leaves_with_path(results["one"][1])
  flat_eight = dict(jax.tree_util.tree_leaves_with_path(results["eight"][1]))
  # Attention's key bias has an identically zero gradient (softmax ignores a
  # shift shared by all keys), so Adam's first steps normalise pure round-off
  # there: allow a fifth of one learning-rate step, far below any real update.
  atol = 0.2 * config_lib.learning_rate(c)
  for path, a in flat_one:
    np.testing.assert_allclose(a, flat_eight[path], rtol=1e-4, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
  assert kernel.shape == (64, 256)


@pytest.mark.slow  # the interpreted kernels compile slowly on the CPU: 1.5 min here
def test_pallas_short_step_equals_the_xla_step(interpreted_kernels):
  """The tiny DDAE step with attention_impl = "pallas_short" (models/short_attention.py's
  kernels, interpreted on the CPU, under shard_map over a 2 x 2 data x fsdp mesh) against
  the "xla" step: the same losses and parameters after two updates, in float32."""
  c = tiny("fsdp")
  c.optim.warmup_epochs = 0.0  # a real update from the first step
  c.sharding.mesh = (("data", 2), ("fsdp", 2))
  images = smooth_images(16)
  results = {}
  for impl in ("xla", "pallas_short"):
    c.model.attention_impl = impl
    built = ts.build(c, jax.devices()[:4])
    assert built.model.derived.attention_impl == impl
    state, losses = built.state, []
    for _ in range(2):
      state, metrics = built.step(state, {"image": images})
      losses.append(float(metrics["loss"]))
    results[impl] = (losses, host(state["params"]))
  np.testing.assert_allclose(results["pallas_short"][0], results["xla"][0], rtol=1e-5)
  ours = dict(jax.tree_util.tree_leaves_with_path(results["pallas_short"][1]))
  # As in the mesh test above: the key bias's gradient is zero up to round-off.
  atol = 0.2 * config_lib.learning_rate(c)
  for path, ref in jax.tree_util.tree_leaves_with_path(results["xla"][1]):
    np.testing.assert_allclose(ours[path], ref, rtol=1e-4, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_fsdp_rules_split_parameters_and_optimizer_state():
  c = tiny("fsdp")
  built = ts.build(c, jax.devices()[:8])
  state = built.state
  kernel = state["params"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]  # [64, 256]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (64, 32)
  mu = state["opt_state"]
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(mu) if leaf.ndim == 2}
  assert jax.sharding.PartitionSpec(None, "fsdp") in specs


def test_step_does_not_retrace_and_donates(monkeypatch):
  c = tiny()
  traces = retrace.trace_at_most_once(monkeypatch)  # a second trace raises in step_fn
  built = ts.build(c, jax.devices()[:2])
  step_fn = built.step
  state = built.state
  images = smooth_images(16)
  for i in range(3):
    old_leaf = state["params"]["encoder"]["cls_token"]
    state, _ = step_fn(state, {"image": images + i})
    assert traces  # traced at the first step, and only then
    assert old_leaf.is_deleted()  # donated
  assert int(state["step"]) == 3


def test_ema_update_is_equation_4_and_gets_no_gradient():
  c = tiny()
  c.optim.warmup_epochs = 0.0
  built = ts.build(c, jax.devices()[:1])
  state = built.state
  images = smooth_images(16)
  for _ in range(2):  # the second step starts from EMA != params
    before = host(state)
    state, metrics = built.step(state, {"image": images})
  assert not np.allclose(before["ema_params"]["cls_token"],
                         before["params"]["encoder"]["cls_token"])
  after = host(state)
  m = float(schedules.ema_momentum(c, jnp.asarray(before["step"]), config_lib.steps(c)))
  assert m == pytest.approx(float(metrics["ema_momentum"]))
  want = jax.tree.map(lambda e, p: m * e + (1 - m) * p, before["ema_params"],
                      after["params"]["encoder"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after["ema_params"], want)
  # Nothing but eq. 4 touched theta': no gradient reached the momentum encoder.
  assert set(after["params"]) == {"encoder", "pixel_decoder", "distill_decoder", "beta"}


@pytest.mark.parametrize("overrides,expect", [
    ({"pixel.enabled": False}, {"no": ["pixel_loss/block_1"]}),
    # Slow: the MAE rows of test_methods also train these three switches.
    pytest.param({"distill.enabled": False}, {"no": ["distill_loss/block_1", "ema_momentum"]},
                 marks=pytest.mark.slow),
    pytest.param({"dds.deep_supervision": False},
                 {"has": ["pixel_loss/block_4", "beta/shared/block_4"],
                  "no": ["pixel_loss/block_1"]}, marks=pytest.mark.slow),
    pytest.param({"dds.dynamic": False},
                 {"no": ["beta/shared/block_1"], "zero": ["beta_regularizer"]},
                 marks=pytest.mark.slow),
    ({"dds.beta_learnable": False, "dds.beta_init": (0.0, -0.1, -0.3, -0.7)},
     {"fixed_beta": (0.0, -0.1, -0.3, -0.7)}),
    ({"dds.beta_per_branch": True}, {"has": ["beta/pixel/block_2", "beta/distill/block_2"]}),
    ({"dds.blocks": (2, 4), "dds.block_weights": (0.5, 1.0)},
     {"has": ["pixel_loss/block_2"], "no": ["pixel_loss/block_1"]}),
    ({"masking.kind": "random", "dds.normalizer": "weight_sum",
      "distill.target_norm": "features", "model.feature_norm": "final"}, {}),
])
def test_ablation_switches(overrides, expect):
  c = tiny()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  c.optim.warmup_epochs = 0.0
  built = ts.build(c, jax.devices()[:1])
  state, metrics = built.step(built.state, {"image": smooth_images(16)})
  metrics = {k: float(v) for k, v in metrics.items()}
  assert np.isfinite(metrics["loss"])
  for k in expect.get("has", []):
    assert k in metrics, k
  for k in expect.get("no", []):
    assert k not in metrics, k
  for k in expect.get("zero", []):
    assert metrics[k] == 0.0
  if "fixed_beta" in expect:
    np.testing.assert_array_equal(np.asarray(state["params"]["beta"]["shared"]),
                                  np.asarray(expect["fixed_beta"], np.float32))
  else:
    assert "ema_params" in state or not c.distill.enabled


def test_tiny_model_overfits_a_handful_of_images():
  """Every loss term falls by a large factor in 300 CPU steps on 8 images."""
  c = tiny()
  c.batch_size, c.num_train_images, c.epochs = 8, 8, 300.0
  c.optim.base_lr = 5e-3 * 256 / 8
  c.optim.warmup_epochs = 10.0
  c.ema.ramp_epochs = 300.0
  built = ts.build(c, jax.devices()[:1])
  state, images = built.state, {"image": smooth_images(8)}
  history = []
  for _ in range(300):
    state, metrics = built.step(state, images)
    history.append(jax.device_get(metrics))
  first = {k: np.mean([h[k] for h in history[:5]]) for k in history[0]}
  last = {k: np.mean([h[k] for h in history[-20:]]) for k in history[0]}
  # BootMAE's per-channel targets are harder to fit than MAE's per-patch ones
  # (each channel of a 4 x 4 patch standardised alone): 2.7x here against 3.6x
  # with pixel.norm_pix_stats = "per_patch" (2-core CPU, 2026-11-29).
  assert last["pixel_loss"] < first["pixel_loss"] / 2.5, (first, last)
  assert last["distill_loss"] < first["distill_loss"] / 5, (first, last)
  for g in (1, 2, 3, 4):
    assert last[f"pixel_loss/block_{g}"] < first[f"pixel_loss/block_{g}"] / 2
    assert last[f"distill_loss/block_{g}"] < first[f"distill_loss/block_{g}"] / 3
  # beta learns (its direction follows the errors, README "Beta over training").
  assert abs(last["beta/shared/block_4"] - first["beta/shared/block_4"]) > 0.05
