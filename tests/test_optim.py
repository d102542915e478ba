"""ddae_jax/optim.py: pretraining's schedules and AdamW with beta apart; evaluation's layer-wise
decay against the BEiT rule written out by name, AdamW with it against optax.adamw per
parameter, LARS against a NumPy transcription of MAE's util/lars.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load, tiny

from ddae_jax import config_checks, config_lib, optim
from ddae_jax.evaluation import classifier
from ddae_jax.methods import schedules
from ddae_jax.sharding import path_str

DEPTH = 3


def test_linear_momentum_schedule_endpoints():
  c = config_lib.base_config()
  c.ema.schedule, c.ema.ramp_epochs = "linear", 50.0  # the option; BootMAE's is the default
  ramp = config_lib.epochs_to_steps(c, c.ema.ramp_epochs)
  steps = config_lib.steps(c)
  assert float(schedules.ema_momentum(c, jnp.asarray(0), steps)) == pytest.approx(0.999)
  assert float(schedules.ema_momentum(c, jnp.asarray(ramp // 2), steps)) == pytest.approx(
      (0.999 + 0.99999) / 2, abs=1e-7)
  assert float(schedules.ema_momentum(c, jnp.asarray(10 * ramp), steps)) == pytest.approx(0.99999)


def test_learning_rate_schedule_is_scaled_warmup_cosine():
  c = config_lib.base_config()
  sched = optim.lr_schedule(c, config_lib.steps(c))
  warm = config_lib.epochs_to_steps(c, 20)
  peak = 1.5e-4 * 4096 / 256
  assert float(sched(warm)) == pytest.approx(peak)
  assert float(sched(warm // 2)) == pytest.approx(peak / 2, rel=1e-3)
  total = config_lib.total_steps(c)
  assert total == round(100 * 1_281_167 / 4096)
  assert float(sched(total)) == pytest.approx(1e-4, rel=1e-6)  # BootMAE's --min_lr 1e-4
  c.optim.min_lr = 0.0
  assert float(optim.lr_schedule(c, config_lib.steps(c))(total)) == pytest.approx(0.0, abs=1e-9)


def test_beta_is_excluded_from_weight_decay_and_trained_by_adam():
  c = tiny()
  c.optim.weight_decay = 0.5
  c.dds.beta_per_branch = True
  params = {"beta": {"pixel": jnp.full((4,), -0.5)}, "encoder": {"k": jnp.ones((3, 3)),
                                                                 "b": jnp.ones((3,))}}
  labels = optim.param_labels(params)
  assert labels == {"beta": {"pixel": "beta"}, "encoder": {"k": "decay", "b": "no_decay"}}
  # With a zero gradient, weight decay alone moves a decayed matrix but not beta.
  tx = optim.make_optimizer(c, optim.lr_schedule(c, config_lib.steps(c)))
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
  assert np.all(np.asarray(updates["beta"]["pixel"]) == 0)
  assert np.all(np.asarray(updates["encoder"]["k"]) < 0)
  assert np.all(np.asarray(updates["encoder"]["b"]) == 0)
  # Beta's update is Adam's, lr from the same schedule: first step = -lr * sign(g).
  c.optim.warmup_epochs = 0.0
  tx = optim.make_optimizer(c, optim.lr_schedule(c, config_lib.steps(c)))
  g = {"beta": {"pixel": jnp.asarray([1.0, -2.0, 0.5, 3.0])},
       "encoder": jax.tree.map(jnp.zeros_like, params["encoder"])}
  updates, _ = tx.update(g, tx.init(params), params)
  ref = optax.adam(config_lib.learning_rate(c), b1=c.optim.b1, b2=c.optim.b2)
  ref_updates, _ = ref.update(g["beta"], ref.init(params["beta"]))
  np.testing.assert_allclose(updates["beta"]["pixel"], ref_updates["pixel"], rtol=1e-6)


def _abstract_classifier(pooling="avg"):
  model = classifier.ViTClassifier(patch_size=4, width=32, depth=DEPTH, num_heads=2,
                                   num_classes=5, pooling=pooling)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 16, 16, 3))))["params"]


def _beit_layer(name):
  """BEiT's rule, written out over the top-level names the classifier has."""
  top, *rest = name.split("/")
  if top in ("fc_norm", "head"):
    return DEPTH + 1
  sub = rest[0]
  if sub in ("patch_embed", "cls_token", "pos_embed"):
    return 0
  if sub.startswith("block_"):
    return int(sub.split("_")[1]) + 1
  assert sub == "norm", name
  return DEPTH + 1


def test_layer_decay_scales_follow_the_beit_rule():
  params = _abstract_classifier()
  scales = optim.layer_scales(params, DEPTH, 0.65)
  flat = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(scales)}
  assert flat["encoder/pos_embed"] == pytest.approx(0.65 ** 4)
  assert flat["encoder/block_0/attn/qkv/kernel"] == pytest.approx(0.65 ** 3)
  assert flat["encoder/block_2/mlp/fc2/bias"] == pytest.approx(0.65)
  assert flat["head/kernel"] == flat["fc_norm/scale"] == flat["encoder/norm/bias"] == 1.0
  for name, scale in flat.items():
    assert scale == pytest.approx(0.65 ** (DEPTH + 1 - _beit_layer(name))), name
  assert {_beit_layer(n) for n in flat} == set(range(DEPTH + 2))


def test_adamw_with_layer_decay_matches_optax_adamw_per_parameter():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  block = lambda: {"attn": {"qkv": {"kernel": leaf(4, 12), "bias": leaf(12)}}}
  params = {"encoder": {"patch_embed": {"kernel": leaf(6, 4)}, "cls_token": leaf(1, 1, 4),
                        "pos_embed": leaf(1, 3, 4), **{f"block_{i}": block() for i in range(3)},
                        "norm": {"scale": leaf(4)}},
            "fc_norm": {"bias": leaf(4)}, "head": {"kernel": leaf(4, 5)}}
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
  lr, wd, decay = 1e-2, 0.05, 0.75
  no_decay = lambda n, p: p.ndim < 2 or n.split("/")[-1] in ("cls_token", "pos_embed")

  @jax.jit  # one program for both sides: eager optax would compile every op per shape
  def both(params, grads):
    tx = optim.adamw_layer_decay(lambda _: lr, params, DEPTH, decay, wd)
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    refs = {}
    for path, p in jax.tree_util.tree_leaves_with_path(params):
      name = path_str(path)
      ref_tx = optax.adamw(lr * decay ** (DEPTH + 1 - _beit_layer(name)), b1=0.9, b2=0.999,
                           eps=1e-8, weight_decay=0.0 if no_decay(name, p) else wd)
      g = jax.tree_util.tree_leaves_with_path(grads)[len(refs)][1]
      ref_state = ref_tx.init(p)
      for _ in range(2):
        ref, ref_state = ref_tx.update(g, ref_state, p)
      refs[name] = ref
    return updates, refs

  updates, refs = both(params, grads)
  for path, got in jax.tree_util.tree_leaves_with_path(updates):
    name = path_str(path)
    np.testing.assert_allclose(got, refs[name], rtol=2e-5, atol=1e-9, err_msg=name)


def _numpy_lars(params, grads_seq, lrs, momentum, weight_decay, trust):
  """MAE util/lars.py, transcribed loop for loop."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs, strict=True):
    for k, p in params.items():
      dp = grads[k].astype(np.float64)
      if p.ndim > 1:
        dp = dp + weight_decay * p
        param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
        q = (trust * param_norm / update_norm) if (param_norm > 0 and update_norm > 0) else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      params[k] = p - lr * mu[k]
  return params


def test_lars_matches_a_numpy_transcription_of_mae():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)),
            "zero_kernel": np.zeros((2, 2)), "scale": np.ones((3,))}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(4)]
  schedule = optax.linear_schedule(0.0, 0.4, 3)
  lrs = [float(schedule(i)) for i in range(4)]
  for wd in (0.0, 0.05):
    tx = optim.lars(schedule, momentum=0.9, weight_decay=wd, trust_coefficient=0.001)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for grads in grads_seq:
      updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
      p = optax.apply_updates(p, updates)
    ref = _numpy_lars(params, grads_seq, lrs, 0.9, wd, 0.001)
    for k in params:
      np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} wd={wd}")
  # The zero matrix has |p| = 0: no adaptation, so it moves by lr * momentum sums of g.
  assert not np.allclose(p["zero_kernel"], 0.0)


@pytest.mark.parametrize("variant, decayed, kept", [
    ("", ["mask_token", "kernel"], ["cls_token", "pos_embed", "bias"]),  # BootMAE's list
    ("mae", ["cls_token", "mask_token", "pos_embed", "kernel"], ["bias"]),  # timm's, no skip
])
def test_pretraining_weight_decay_follows_the_lineage(variant, decayed, kept):
  c = load("configs/vitb.py", variant)
  config_checks.validate(c)
  params = {"cls_token": jnp.ones((1, 1, 4)), "pos_embed": jnp.ones((1, 5, 4)),
            "mask_token": jnp.ones((1, 1, 4)), "kernel": jnp.ones((4, 4)),
            "bias": jnp.ones((4,))}
  # The optimizer the run builds: with a zero gradient only weight decay moves a parameter.
  c.optim.warmup_epochs = 0.0
  tx = optim.make_optimizer(c, optim.lr_schedule(c, config_lib.steps(c)))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = sorted(k for k, u in updates.items() if np.any(np.asarray(u) != 0))
  assert moved == sorted(decayed)
  assert sorted(set(params) - set(moved)) == sorted(kept)


def test_an_unknown_no_decay_name_is_named():
  c = load("configs/vitb.py")
  c.optim.no_decay_names = ("cls_token", "patch_embed")
  with pytest.raises(config_lib.ConfigError, match=r"optim.no_decay_names = .*among"):
    config_checks.validate(c)
