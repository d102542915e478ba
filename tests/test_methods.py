"""MAE, D/DS/DDS-MAE, BEiT-v2, DDS-BEiT-v2 and every ablation row: tiny training runs and losses.

Every row of ablations.TABLES trains a few steps of its tiny version with its
loss falling. Rows whose tiny versions are the same program (e.g. Table 7's
learnable rows differ only in beta's initial value) share one compiled step:
XLA's CPU compile time, not the steps, is what these tests cost.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import retrace
from helpers import config_module, load, smooth_images
from references import mae_loss_numpy
from repo_paths import repo_path

from ddae_jax import ablations, config_checks, config_lib, methods, optim, sharding
from ddae_jax import train_step as ts
from ddae_jax.models.decoder import decode_per_block
from ddae_jax.objectives import dynamic_weights as dw
from ddae_jax.objectives import masking
from ddae_jax.perf import flops

ROWS = sorted({arg for rows in ablations.TABLES.values() for _, arg, _ in rows})


def tiny_version(config_arg: str):
  """The row's config, shrunk: a 4-deep ViT (6-deep for K = 6), 16 px, patch 4, batch 8."""
  c = load(config_arg)
  c.model.size = "tiny6" if c.dds.num_supervised == 6 and c.dds.deep_supervision else "tiny"
  c.model.image_size, c.model.patch_size, c.model.dtype = 16, 4, "float32"
  c.masking.min_patches = 2
  c.pixel.decoder_width, c.pixel.decoder_depth, c.pixel.decoder_heads = 32, 1, 2
  c.distill.decoder_depth = 1
  c.tokenizer.size, c.tokenizer.patch_size, c.tokenizer.vocab_size = "tiny", 4, 64
  c.tokenizer.checkpoint, c.tokenizer.random_weights = "", True
  if c.cls_pt.early_block:  # BEiT-v2's block 9 of 12: block 3 of the tiny 4
    c.cls_pt.early_block = 3
  c.batch_size, c.num_train_images, c.epochs = 8, 8, 100.0
  c.optim.base_lr, c.optim.warmup_epochs, c.optim.grad_clip_norm = 1e-3 * 256 / 8, 0.0, 0.0
  # A 100-step toy: a linear momentum ramp (BootMAE's spans 400 epochs), and the
  # distillation weight at 1 (its ramp would raise the loss over the 4 steps).
  c.ema.schedule = "linear"
  c.distill.weight_ramp = 0.0
  c.ema.momentum_start, c.ema.momentum_end, c.ema.ramp_epochs = 0.99, 0.999, 5.0
  return c


def program_key(c) -> str:
  """Configs with equal keys compile to the same train step (beta's start is state, not code)."""
  d = c.to_dict()
  d["dds"] = {k: v for k, v in d["dds"].items()
              if k not in ("beta_init", "deep_supervision", "num_supervised", "blocks",
                           "block_weights")}
  d["derived"] = [config_lib.supervised_blocks(c), config_lib.block_weights(c)]
  return json.dumps(d, sort_keys=True, default=str)


def fresh_state(c, model, tx, mesh):
  """The row's own initial state, made eagerly (op by op, cached across rows)."""
  rng = jax.random.PRNGKey(c.seed)
  init = functools.partial(ts.init_state, model, tx)
  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, c.sharding.rules)
  return jax.device_put(init(rng), shardings), shardings


# Table 4's DDAE row is the default config, which test_train_step.py trains
# (and overfits) at tiny size already; test_default_ddae_row_is_the_default checks it.
DEFAULT_ROW = "configs/vitb.py:dds_both"


def _groups():
  groups = {}
  for arg in ROWS:
    if arg != DEFAULT_ROW:
      groups.setdefault(program_key(tiny_version(arg)), []).append(arg)
  # The default run trains MAE and the DDS-MAE group (Tables 2, 3, 6, 7's
  # shared program); the other programs cost 10-40 s of compile each and run
  # with the slow checks (`-m slow`, which CI runs too).
  fast = {"configs/mae_vits.py:mae", "configs/mae_vits.py:dds_mae"}
  return [pytest.param(rows, id="+".join(r.split("/")[-1] for r in rows),
                       marks=() if fast & set(rows) else pytest.mark.slow)
          for rows in groups.values()]


@pytest.mark.parametrize("rows", _groups())
def test_every_table_row_trains_its_tiny_version(rows, monkeypatch):
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:1])
  images = {"image": smooth_images(8, size=16)}
  first = tiny_version(rows[0])
  model = methods.make(first, config_lib.resolve(first))
  schedule = optim.lr_schedule(first, model.derived.steps)
  tx = optim.make_optimizer(first, schedule)
  initial, shardings = fresh_state(first, model, tx, mesh)
  initial = jax.device_get(initial)
  traces = retrace.trace_at_most_once(monkeypatch)  # a second trace raises in step()
  step = ts.make_train_step(model, tx, schedule, mesh, shardings)
  for arg in rows:
    c = tiny_version(arg)
    config_checks.validate(c, num_devices=1)
    # The group's rows differ only in beta's initial value (program_key).
    state = jax.tree.map(np.copy, initial)
    if "beta" in state["params"]:
      state["params"]["beta"]["shared"] = config_lib.beta_init(c)
    state = jax.device_put(state, shardings)
    start = jax.device_get(state["params"])
    losses = []
    for _ in range(4):
      state, metrics = step(state, images)
      losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), (arg, losses)
    assert np.mean(losses[-2:]) < 0.9 * losses[0], (arg, losses)
    blocks, _, dynamic = config_lib.branch_supervision(
        c, "mim" if c.method == "beitv2" else "pixel")
    prefix = "mim_loss" if c.method == "beitv2" else "pixel_loss"
    assert sorted(k for k in metrics if k.startswith(prefix + "/")) == sorted(
        f"{prefix}/block_{g}" for g in blocks), arg
    # MAE-style rows have no momentum encoder; DDAE rows do; BEiT-v2 keeps its tokenizer.
    assert ("ema_params" in state) == (c.method == "ddae" and c.distill.enabled), arg
    assert ("tokenizer" in state) == (c.method == "beitv2"), arg
    assert dynamic == bool(config_lib.beta_branches(c)) or c.method == "ddae", arg
    if not config_lib.beta_branches(c):
      assert "beta" not in state["params"], arg
    elif c.dds.beta_learnable:
      assert not np.allclose(jax.device_get(state["params"]["beta"]["shared"]),
                             start["beta"]["shared"]), arg
    else:
      np.testing.assert_array_equal(jax.device_get(state["params"]["beta"]["shared"]),
                                    start["beta"]["shared"])
  assert traces  # every row of the group ran the one compiled program


def test_default_ddae_row_is_the_default():
  assert program_key(load("configs/vitb.py", "dds_both")) == program_key(
      load("configs/vitb.py"))


def test_rows_are_the_papers_settings():
  mae = load("configs/mae_vits.py:mae")
  assert (mae.masking.kind, mae.masking.ratio, mae.pixel.decoder_depth,
          mae.pixel.decoder_width, mae.pixel.norm_pix, mae.distill.enabled) == (
              "random", 0.75, 8, 512, True, False)
  assert config_lib.supervised_blocks(mae) == (12,) and config_lib.beta_branches(mae) == ()
  table3 = {r: load(a) for r, a, _ in ablations.TABLES["table3"]}
  assert [(c.dds.deep_supervision, c.dds.dynamic) for c in table3.values()] == [
      (False, False), (False, True), (True, False), (True, True)]
  assert [config_lib.supervised_blocks(load(a)) for _, a, _ in ablations.TABLES["table6"]] == [
      (12,), (6, 12), (3, 6, 9, 12), (2, 4, 6, 8, 10, 12)]
  table7 = [load(a) for _, a, _ in ablations.TABLES["table7"]]
  assert [c.dds.beta_learnable for c in table7] == [False, False, True, True, True, True]
  assert [list(config_lib.beta_init(c)) for c in table7] == [
      [0.0] * 4, [-0.5] * 4, [0.0] * 4, [-0.1, -0.3, -0.5, -0.7], [-0.7, -0.5, -0.3, -0.1],
      [-0.5] * 4]
  table4 = [load(a) for _, a, _ in ablations.TABLES["table4"]]
  assert [(c.pixel.dds, c.distill.dds) for c in table4] == [
      (False, False), (False, True), (True, False), (True, True)]
  assert [len(config_lib.branch_supervision(c, "pixel")[0]) for c in table4] == [1, 1, 4, 4]
  beit, dds_beit = (load(a) for _, a, _ in ablations.TABLES["table2"][2:])
  assert masking.num_masked(beit.masking.ratio, (14, 14)) == 75
  assert beit.masking.kind == "blockwise" and config_lib.supervised_blocks(beit) == (12,)
  assert config_lib.supervised_blocks(dds_beit) == (3, 6, 9, 12)
  assert config_lib.beta_branches(dds_beit) == ("shared",)
  for rows in ablations.TABLES.values():
    for _, arg, _ in rows:
      config_checks.validate(load(arg), num_devices=8)
  # MAE ViT-B's step is MAE's cost, DDS-MAE adds three more decoder passes.
  mae_b, dds_b = load("configs/mae_vitb.py:mae,ep300"), load("configs/mae_vitb.py:dds_mae")
  train_flops = lambda c: flops.train_flops_per_image(c, config_lib.resolve(c))
  assert 55e9 < train_flops(mae_b)["total"] < 62e9
  assert train_flops(dds_b)["pixel_decoder"] == pytest.approx(
      4 * train_flops(mae_b)["pixel_decoder"])
  assert {"tokenizer", "cls_pt_head"} <= set(train_flops(beit))
  # BEiT-v2's student and augmentation (README: each value's source in microsoft/unilm beit2).
  for c in (beit, dds_beit):
    assert (c.model.pos_embed, c.model.rel_pos_bias, c.model.layer_scale) == ("none", True, 0.1)
    assert (c.cls_pt.early_block, c.cls_pt.head_depth, c.model.feature_norm) == (9, 2, "final")
    assert (tuple(c.data.crop_scale), c.data.color_jitter, c.data.flip) == ((0.2, 1.0), 0.4, True)
    assert (c.batch_size, config_lib.learning_rate(c), c.optim.warmup_epochs) == (
        2048, pytest.approx(1.5e-3), 10.0)


def test_every_variant_is_loaded_by_the_config_test():
  """tests/test_config.py loads each config file with each name in its VARIANTS."""
  listed = set()
  for path in ("configs/vitb.py", "configs/mae_vits.py", "configs/mae_vitb.py",
               "configs/beitv2_vitb.py"):
    listed |= set(config_module(path)["VARIANTS"])
  assert set(ablations.VARIANTS) <= listed, set(ablations.VARIANTS) - listed


def test_readme_maps_every_row_to_its_command():
  readme = open(repo_path("README.md")).read().split("## Reproducing the paper's tables")[1]
  for rows in ablations.TABLES.values():
    for row, arg, top1 in rows:
      assert f"| {row} | `{arg}` | {top1} |" in readme, arg


def _mae_forward(model, params, images, mask):
  """The MAE variant's loss and its pixel predictions for the same mask."""
  distance = dw.distance_map(mask, model.grid)
  loss, _ = model.loss(params, images, mask, distance)
  ids_keep, ids_restore = masking.visible_and_masked_ids(mask, model.num_visible())
  features = model.encode(params["encoder"], images, ids_keep)["features"]
  pred = decode_per_block(model.pixel_decoder, {"params": params["pixel_decoder"]},
                          features, ids_restore, model.grid)
  return loss, pred


def test_mae_variant_loss_is_mae_norm_pix_loss():
  c = tiny_version("configs/mae_vits.py:mae")
  model = methods.make(c, config_lib.resolve(c))
  params = model.init(jax.random.PRNGKey(0))
  images = jnp.asarray(np.random.RandomState(0).randn(4, 16, 16, 3), jnp.float32)
  mask = masking.random_mask(jax.random.PRNGKey(1), 4, model.grid, 0.75)
  loss, pred = jax.jit(functools.partial(_mae_forward, model))(params, images, mask)
  assert pred.shape == (4, 1, 16, 48)
  want = mae_loss_numpy(np.asarray(images).transpose(0, 3, 1, 2), np.asarray(pred)[:, 0],
                        np.asarray(mask), 4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def _beit_forward(model, params, images, mask, targets):
  distance = dw.distance_map(mask, model.grid)
  loss, metrics = model.loss(params, images, mask, distance, targets)
  out = model.encode(params["encoder"], images, mask)
  # The class-token head's tokens after its blocks, before the shared norm.
  early, last = out["extra_hidden"][:, 0], out["extra_hidden"][:, 1]
  head_in = jnp.concatenate([last[:, :1], early[:, 1:]], axis=1)
  head_out = model.cls_pt_head.apply({"params": params["cls_pt_head"]}, head_in,
                                     out["attention_bias"])
  return loss, metrics, out["features"][:, :, 1:], distance, head_out[:, 1:]


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]


@pytest.mark.parametrize("variant", ["", "dds_beitv2"])
def test_beitv2_loss_is_masked_cross_entropy_by_hand(variant):
  """BEiT-v2: mean CE over masked patches, plus the class-token head's (its patch tokens
  through the shared norm and head); DDS: sum_i lambda_i mean_b sum_m w CE / sum_m w + reg
  + the same."""
  c = tiny_version("configs/beitv2_vitb.py" + (":" + variant if variant else ""))
  c.tokenizer.vocab_size = 16
  model = methods.make(c, config_lib.resolve(c))
  params = model.init(jax.random.PRNGKey(0))
  if "beta" in params:
    params["beta"]["shared"] = jnp.asarray([-0.5, 0.4, -1.0, 0.0])
  rs = np.random.RandomState(3)
  images = jnp.asarray(rs.randn(3, 16, 16, 3), jnp.float32)
  mask = masking.blockwise_mask(jax.random.PRNGKey(2), 3, model.grid, c.masking.ratio,
                                min_patches=2)
  targets = jnp.asarray(rs.randint(0, 16, (3, 16)), jnp.int32)
  loss, metrics, features, distance, head_out = jax.jit(
      functools.partial(_beit_forward, model))(params, images, mask, targets)
  head = jax.tree.map(lambda x: np.asarray(x, np.float64), params["lm_head"])
  logits = np.asarray(features, np.float64) @ head["kernel"] + head["bias"]  # [B, K, N, V]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  m, t, dist = np.asarray(mask), np.asarray(targets), np.asarray(distance, np.float64)
  norm = jax.tree.map(lambda x: np.asarray(x, np.float64), params["encoder"]["norm"])
  cls_logits = _layer_norm(np.asarray(head_out, np.float64), norm) @ head["kernel"] + head["bias"]
  cls_logp = cls_logits - np.log(np.exp(cls_logits).sum(-1, keepdims=True))  # [B, N, V]
  cls_ce = np.mean([-cls_logp[b, n, t[b, n]] for b in range(3) for n in range(16) if m[b, n]])
  np.testing.assert_allclose(float(metrics["cls_pt_loss"]), cls_ce, rtol=1e-5)
  lambdas = config_lib.block_weights(c)
  want = reg = 0.0
  for k in range(len(lambdas)):
    for b in range(3):
      ce = -logp[b, k, np.arange(16), t[b]]
      w = m[b].astype(np.float64)
      if "beta" in params:
        beta = float(params["beta"]["shared"][k])
        h = np.where(m[b], np.exp(np.where(m[b], dist[b], 1.0) ** beta), 0.0)
        h /= h.sum()
        w, reg = h / h.max(), reg + np.sqrt((h ** 2).sum()) / 3
      # The config's normaliser: the weights' sum (default) or the masked count.
      denom = w[m[b]].sum() if c.dds.normalizer == "weight_sum" else m[b].sum()
      want += lambdas[k] * (w * ce)[m[b]].sum() / denom / 3
  want += c.dds.reg_weight * reg + cls_ce  # BEiT-v2 adds the two CEs with weight 1
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  if not variant:  # plain BEiT-v2: exactly the mean CE over all masked positions
    ce = [-logp[b, 0, n, t[b, n]] for b in range(3) for n in range(16) if m[b, n]]
    np.testing.assert_allclose(float(metrics["mim_loss"]), np.mean(ce), rtol=1e-5)


@pytest.mark.slow
def test_beitv2_flops_match_xla_cost_analysis():
  """The analytic count (flops.py) against XLA's count of the traced forward, as test_flops."""
  c = config_lib.base_config()
  ablations.beitv2_defaults(c)
  ablations.VARIANTS["dds_beitv2"](c)
  c.model.size, c.model.image_size, c.model.dtype = "small", 96, "float32"
  c.tokenizer.size = "small"
  model = methods.make(c, config_lib.resolve(c))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  tokenizer = jax.eval_shape(model.init_tokenizer, jax.random.PRNGKey(0))
  raw = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.uint8)

  def forward(params, tokenizer, raw):
    mask = masking.make_mask(jax.random.PRNGKey(0), 2, model.grid, c.masking.ratio, "blockwise")
    targets = model.tokenize(tokenizer, raw)
    return model.loss(params, raw.astype(jnp.float32), mask, dw.distance_map(mask, model.grid),
                      targets)[0]

  lowered = jax.jit(forward).lower(params, tokenizer, raw)
  cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = sum(flops.forward_flops_per_image(c, config_lib.resolve(c)).values()) * 2
  assert 0.85 < analytic / cost["flops"] < 1.02, (analytic, cost["flops"])
  # Table 4: a branch without DDS decodes one block instead of K = 4.
  both, none = (load("configs/vitb.py", v) for v in ("dds_both", "dds_none"))
  forward = lambda c: flops.forward_flops_per_image(c, config_lib.resolve(c))
  assert forward(both)["distill_decoder"] == pytest.approx(
      4 * forward(none)["distill_decoder"])


def test_beitv2_optimizer_is_beits_adamw_with_clipping():
  """The built chain against torch's AdamW + clip_grad_norm_ with BEiT-v2's settings."""
  torch = pytest.importorskip("torch")
  c = load("configs/beitv2_vitb.py")
  o = c.optim
  assert (o.b1, o.b2, o.eps, o.grad_clip_norm, o.weight_decay) == (0.9, 0.98, 1e-8, 3.0, 0.05)
  assert config_lib.learning_rate(c) == pytest.approx(1.5e-3) and o.min_lr == 1e-5
  c.num_train_images, c.batch_size, c.epochs, o.warmup_epochs = 2048 * 3, 2048, 2.0, 1.0
  schedule = optim.lr_schedule(c, config_lib.steps(c))
  # BEiT's cosine_scheduler after warm-up: min + (lr - min) / 2 (1 + cos(pi i / (T - w))).
  for step in (3, 4, 5):
    want = 1e-5 + 0.5 * (1.5e-3 - 1e-5) * (1 + np.cos(np.pi * (step - 3) / 3))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-6)
  rs = np.random.RandomState(0)
  params = {"w": rs.randn(4, 6).astype(np.float32), "b": rs.randn(6).astype(np.float32)}
  grads = [{k: (s * rs.randn(*v.shape)).astype(np.float32) for k, v in params.items()}
           for s in (2.0, 1e-3, 0.5)]  # the first two are clipped at norm 3, the last is not
  tx = optim.make_optimizer(c, optim.lr_schedule(c, config_lib.steps(c)))
  state, ours = tx.init(params), dict(params)
  weight, bias = (torch.nn.Parameter(torch.from_numpy(params[k].copy())) for k in ("w", "b"))
  adamw = torch.optim.AdamW([{"params": [weight], "weight_decay": 0.05},
                             {"params": [bias], "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.98), eps=1e-8)
  for step, g in enumerate(grads):
    updates, state = tx.update(g, state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)
    weight.grad, bias.grad = torch.from_numpy(g["w"]), torch.from_numpy(g["b"])
    torch.nn.utils.clip_grad_norm_([weight, bias], 3.0)
    for group in adamw.param_groups:
      group["lr"] = float(schedule(step))
    adamw.step()
  np.testing.assert_allclose(np.asarray(ours["w"]), weight.detach().numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ours["b"]), bias.detach().numpy(), rtol=1e-5, atol=1e-7)
  # optim.eps reaches the chain: a large epsilon damps the same first update.
  c.optim.warmup_epochs = 0.0
  first = {}
  for eps in (1e-8, 1.0):
    c.optim.eps = eps
    tx = optim.make_optimizer(c, optim.lr_schedule(c, config_lib.steps(c)))
    first[eps] = np.abs(tx.update(grads[2], tx.init(params), params)[0]["w"]).sum()
  assert 0 < first[1.0] < 0.5 * first[1e-8]
