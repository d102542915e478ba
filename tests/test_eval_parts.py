"""The evaluation protocols' parts against independent references.

Layer-wise decay against the BEiT rule written out by name, AdamW with it
against optax.adamw per parameter, LARS against a NumPy transcription of
MAE's util/lars.py, mixup targets and RandAugment ops against timm, and
evaluation counts on an 8-device mesh.
"""

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from ddae_jax.evaluation import classifier, common, input_pipeline, mixup, optimizers, randaugment
from ddae_jax.sharding import batch_sharding, make_mesh, path_str
from ddae_jax.weights import pretrained
from ddae_jax.weights.checkpoints import CheckpointMissing

DEPTH = 3


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
  scales = optimizers.layer_scales(params, DEPTH, 0.65)
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
    tx = optimizers.adamw_layer_decay(lambda _: lr, params, DEPTH, decay, wd)
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
  for grads, lr in zip(grads_seq, lrs):
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
    tx = optimizers.lars(schedule, momentum=0.9, weight_decay=wd, trust_coefficient=0.001)
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


def _timm_mixup_target(target, num_classes, lam, smoothing):
  """timm.data.mixup.mixup_target, transcribed to NumPy."""
  off = smoothing / num_classes
  y1 = np.full((len(target), num_classes), off)
  y1[np.arange(len(target)), target] = 1.0 - smoothing + off
  return y1 * lam + y1[::-1] * (1.0 - lam)


def test_mixup_and_cutmix_targets_sum_to_one_and_match_timm():
  images = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 3))
  labels = jnp.asarray([0, 3, 1, 4, 2, 3])
  seen_cutmix = seen_mixup = False
  mix = jax.jit(lambda rng: mixup.mix_batch(rng, images, labels, 5, 0.8, 1.0, 1.0, 0.5, 0.1))
  for seed in range(12):
    out, targets, lam = mix(jax.random.PRNGKey(seed))
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, atol=1e-6)
    ref = _timm_mixup_target(np.asarray(labels), 5, float(lam), 0.1)
    np.testing.assert_allclose(targets, ref, atol=1e-6)
    pasted = np.isclose(out, images[::-1]) & ~np.isclose(out, images)
    if np.allclose(out, images * lam + images[::-1] * (1 - lam), atol=1e-5) and lam < 1:
      seen_mixup = True
    elif pasted.any():
      # cutmix: lambda is corrected to the share of pixels kept from the image itself.
      seen_cutmix = True
      assert pasted[0, ..., 0].mean() == pytest.approx(1 - float(lam), abs=1e-6)
  assert seen_mixup and seen_cutmix


class _Fixed:
  """A stand-in generator whose random() returns one value (fixes an op's sign)."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


@pytest.mark.parametrize("negate", [False, True])
def test_randaugment_ops_match_timm(negate, monkeypatch):
  from timm.data import auto_augment
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8))
  hparams = {"translate_pct": 0.45, "img_mean": randaugment.FILL,
             "interpolation": Image.BICUBIC}
  # timm negates when random() > 0.5, this code when its generator's random() < 0.5.
  monkeypatch.setattr(random, "random", lambda: 0.9 if negate else 0.1)
  assert set(randaugment.OP_NAMES) == set(auto_augment._RAND_INCREASING_TRANSFORMS)
  for name in randaugment.OP_NAMES:
    for m in (3.0, 9.0):
      ref = auto_augment.AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams)(img)
      got = randaugment.OPS[name](img, m, _Fixed(0.1 if negate else 0.9))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=f"{name} m={m}")


def test_erasing_fills_only_the_box():
  rng = np.random.default_rng(3)
  boxes = np.stack([mixup.erase_box(rng, 16, 16, 1.0), np.zeros(4, np.int32)])
  images = jnp.full((2, 16, 16, 3), 7.0)
  out = np.asarray(mixup.apply_erasing(jax.random.PRNGKey(0), images, jnp.asarray(boxes)))
  top, left, h, w = boxes[0]
  assert h > 0 and (out[0, top:top + h, left:left + w] != 7.0).all()
  assert (out[0] != 7.0).sum() == h * w * 3 and (out[1] == 7.0).all()


@pytest.mark.parametrize("n", [1, 37, 64, 131])
def test_evaluation_counts_every_example_once_on_8_devices(n):
  mesh = make_mesh((("data", 4), ("fsdp", 2)))
  spec = batch_sharding(mesh)
  global_batch, classes = 16, 7
  labels = np.arange(n) % classes
  # Logits that are right on exactly the examples with an even index.
  step = jax.jit(lambda b: common.classification_sums(
      jax.nn.one_hot(jnp.where(b["label"] >= 0, b["image"][:, 0, 0, 0].astype(jnp.int32), 0),
                     classes) * 5.0, b["label"], b["mask"]))
  for processes in (1, 3):
    shares = [input_pipeline.split_for_process(n, p, processes) for p in range(processes)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    batches = input_pipeline.num_eval_batches(n, global_batch, processes)
    assert all(batches * (global_batch // processes) >= len(s) for s in shares)
  predicted = np.where(np.arange(n) % 2 == 0, labels, (labels + 1) % classes)
  examples = ((np.full((4, 4, 3), predicted[i], np.uint8), int(labels[i])) for i in range(n))
  results = common.accumulate(step, input_pipeline.eval_batches(
      examples, input_pipeline.num_eval_batches(n, global_batch, 1), global_batch, spec,
      image_size=4, crop_ratio=1.0, workers=1))
  assert results["count"] == n
  assert results["top1"] == pytest.approx(np.mean(np.arange(n) % 2 == 0))


def _tiny_config(**kw):
  from ddae_jax.evaluation import config as eval_config
  c = eval_config.quickstart(eval_config.knn_config("tiny"))
  c.update(kw)
  return c


def test_wrong_model_size_or_missing_workdir_is_named(tmp_path):
  small = classifier.ViTClassifier(patch_size=4, width=32, depth=2, num_heads=2, num_classes=3)
  found = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      lambda: small.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]["encoder"])
  found.pop("pos_embed")
  found["feature_norm_1"] = {"scale": np.ones(32), "bias": np.zeros(32)}
  pretrained.save_encoder(tmp_path / "run", found)
  config = _tiny_config(init_dir=str(tmp_path / "run"))
  encoder = classifier.frozen_encoder(config)
  expected = classifier.expected_encoder(encoder, 32)
  with pytest.raises(pretrained.CheckpointMismatch) as err:
    common.restore_encoder(config, expected, 32, 4)
  message = str(err.value)
  assert "width 32, depth 2" in message and "expects width 64, depth 4" in message, message
  assert "block_3" in message and "feature_norm" not in message
  config.init_dir = str(tmp_path / "nowhere")
  with pytest.raises(CheckpointMissing, match="nowhere.*found no such directory"):
    common.restore_encoder(config, expected, 32, 4)


def test_eval_configs_carry_the_papers_settings_and_name_bad_fields():
  from ddae_jax import config_lib
  from ddae_jax.evaluation import config as eval_config
  load = lambda name: eval_config.config_file(*name)()
  vitb, vits, vitl = (load(("finetune", s)) for s in ("base", "small", "large"))
  assert config_lib.learning_rate(vitb) == pytest.approx(8e-3)   # Appendix A, batch 1024
  assert config_lib.learning_rate(vits) == pytest.approx(1.6e-2)
  assert (vitb.optim.layer_decay, vits.optim.layer_decay, vitl.optim.layer_decay) == (
      0.65, 0.75, 0.75)
  assert (vitb.epochs, vitl.epochs, vitb.model.drop_path, vitl.model.drop_path) == (
      100, 50, 0.1, 0.2)
  assert (vitb.batch_size, vitb.optim.warmup_epochs, vitb.optim.weight_decay) == (1024, 5, 0.05)
  a = vitb.aug
  assert (a.mixup, a.cutmix, a.label_smoothing, a.reprob, a.randaug_magnitude) == (
      0.8, 1.0, 0.1, 0.25, 9)
  lin = load(("linear_probe", "base"))
  assert (lin.batch_size, lin.epochs, lin.optim.warmup_epochs, lin.optim.base_lr,
          lin.optim.momentum, lin.optim.weight_decay) == (16384, 90, 10, 0.1, 0.9, 0.0)
  knn = load(("knn", "base"))
  assert (knn.knn.k, knn.knn.temperature) == (20, 0.07)
  vitb.model.pooling = "max"
  with pytest.raises(eval_config.ConfigError, match=r"config.model.pooling.*'avg', 'cls'"):
    eval_config.check(vitb)
  vitb.model.pooling, vitb.optim.layer_decay = "avg", 1.5
  with pytest.raises(eval_config.ConfigError, match=r"config.optim.layer_decay.*\(0, 1\]"):
    eval_config.check(vitb)
  with pytest.raises(eval_config.ConfigError, match="config.init_dir"):
    eval_config.check(lin, require_init_dir=True)
