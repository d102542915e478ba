"""The analysis numbers against hand/NumPy/SciPy computations, and one in-process CLI run."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ddae_jax import config_lib
from ddae_jax.analysis import attention, beta, distance, reconstruction
from ddae_jax.analysis import commands as analyze
from ddae_jax.data.normalize import normalize_images
from ddae_jax.methods.ddae import DDAE
from ddae_jax.models.vit import patchify
from ddae_jax.objectives.ddae import pixel_targets
from ddae_jax.objectives.dynamic_weights import distance_map
from ddae_jax.objectives.masking import make_mask, num_masked
from ddae_jax.weights.checkpoints import Checkpointer

GRID, PATCH = (3, 4), 5


def _hand_mean_pairwise_distance(grid, patch):
  cells = list(itertools.product(range(grid[0]), range(grid[1])))
  total = sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a in cells for b in cells)
  return patch * total / len(cells) ** 2


def test_attention_distance_identity_uniform_and_a_loop():
  n = GRID[0] * GRID[1]
  t = n + 1
  identity = np.broadcast_to(np.eye(t, dtype=np.float32), (2, 3, t, t))
  out = attention.mean_attention_distance(identity, GRID, PATCH)
  np.testing.assert_allclose(out["distance"], 0.0, atol=1e-6)
  np.testing.assert_allclose(out["class_token_mass"], 0.0)

  uniform = np.full((2, 3, t, t), 1.0 / t, np.float32)
  out = attention.mean_attention_distance(uniform, GRID, PATCH)
  np.testing.assert_allclose(out["distance"], _hand_mean_pairwise_distance(GRID, PATCH),
                             rtol=1e-5)
  np.testing.assert_allclose(out["class_token_mass"], 1.0 / t, rtol=1e-6)

  # Random attention, each head differently peaked, against a plain loop that
  # drops the class token and renormalises the patch keys.
  logits = np.random.default_rng(0).normal(size=(2, 3, t, t)) * np.array([0.1, 1, 5])[:, None,
                                                                                     None]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  cells = list(itertools.product(range(GRID[0]), range(GRID[1])))
  expected = np.zeros(3)
  for b, h, q in itertools.product(range(2), range(3), range(n)):
    w = probs[b, h, 1 + q, 1:] / probs[b, h, 1 + q, 1:].sum()
    expected[h] += sum(w[k] * PATCH * math.dist(cells[q], cells[k]) for k in range(n)) / (2 * n)
  out = attention.mean_attention_distance(probs.astype(np.float32), GRID, PATCH)
  np.testing.assert_allclose(out["distance"], expected, rtol=1e-5)

  # Each query on its right neighbour (on itself in the last column), with
  # half of its mass on the class token: 5 px for 3 of every 4 queries.
  right = np.zeros((1, 1, t, t), np.float32)
  for q, (_, c) in enumerate(cells):
    right[0, 0, 1 + q, 1 + q + (c < GRID[1] - 1)] = 0.5
    right[0, 0, 1 + q, 0] = 0.5
  out = attention.mean_attention_distance(right, GRID, PATCH)
  np.testing.assert_allclose(out["distance"], [PATCH * 3 / 4], rtol=1e-6)
  np.testing.assert_allclose(out["class_token_mass"], [0.5])


def test_class_token_map_lands_on_the_constructed_patch():
  n = GRID[0] * GRID[1]
  attn = np.zeros((2, 4, n + 1, n + 1), np.float32)
  attn[0, :, 0, 1 + 6] = 1.0                 # image 0: every head on patch 6 = (1, 2)
  attn[1, :2, 0, 1 + 0] = 1.0                # image 1: half the heads on (0, 0) ...
  attn[1, 2:, 0, 1 + n - 1] = 1.0            # ... half on the last patch (2, 3)
  maps = np.asarray(attention.class_token_map(attn, GRID))
  assert maps.shape == (2,) + GRID
  expected = np.zeros((2,) + GRID, np.float32)
  expected[0, 1, 2] = 1.0
  expected[1, 0, 0] = expected[1, 2, 3] = 0.5
  np.testing.assert_array_equal(maps, expected)
  pixels = attention.upsample_map(maps, PATCH)
  assert pixels.shape == (2, GRID[0] * PATCH, GRID[1] * PATCH)
  hot = np.argwhere(pixels[0] == 1.0)
  np.testing.assert_array_equal(hot.min(0), [1 * PATCH, 2 * PATCH])
  np.testing.assert_array_equal(hot.max(0), [2 * PATCH - 1, 3 * PATCH - 1])
  assert len(hot) == PATCH * PATCH and pixels[0].sum() == PATCH * PATCH


def test_distance_map_panels_are_the_core_distance_map():
  # One blockwise ratio: each is its own compile of the mask's while loop.
  panels = distance.distance_map_panels((14, 14), (0.5, 0.9), ("random",))
  panels += distance.distance_map_panels((14, 14), (0.75,), ("blockwise",))
  assert [(p["kind"], p["ratio"]) for p in panels] == [
      ("random", 0.5), ("random", 0.9), ("blockwise", 0.75)]
  for p in panels:
    mask = p["mask"]
    assert mask.sum() == num_masked(p["ratio"], (14, 14))
    core = np.asarray(distance_map(jnp.asarray(mask.reshape(1, -1)), (14, 14)))[0]
    np.testing.assert_array_equal(p["distance"].reshape(-1), core)
    np.testing.assert_allclose(p["distance"], ndimage.distance_transform_edt(mask), rtol=1e-6)
    assert p["normalized"].max() == 1.0 and p["normalized"][~mask].max() == 0.0


def test_beta_curves_keep_the_resumed_rows_and_sort():
  rows = [{"hparams": {"a": "1"}},
          {"step": 10, "epoch": 1.0, "beta/shared/block_12": -0.4, "beta/shared/block_3": -0.6},
          {"step": 20, "epoch": 2.0, "beta/shared/block_12": -0.3, "beta/shared/block_3": -0.7},
          {"step": 20, "epoch": 2.0, "beta/shared/block_12": -0.2, "beta/shared/block_3": -0.8},
          {"step": 5, "epoch": 0.5, "beta/shared/block_12": -0.5, "loss": 1.0}]
  curves = beta.beta_curves([r for r in rows if "step" in r])
  assert list(curves) == ["beta/shared/block_3", "beta/shared/block_12"]
  assert curves["beta/shared/block_12"]["step"] == [5, 10, 20]
  assert curves["beta/shared/block_12"]["value"] == [-0.5, -0.4, -0.2]  # resumed row wins
  assert curves["beta/shared/block_3"]["epoch"] == [1.0, 2.0]
  assert curves["beta/shared/block_3"]["block"] == 3


def test_beta_curve_summary_finds_the_drop_and_the_rise():
  curve = lambda values: {"value": values, "epoch": [0.5 * i for i in range(len(values))]}
  s = beta.curve_summary(curve([-0.5, -0.8, -1.0, -0.9, -0.7]))
  assert (s["first"], s["min"], s["min_at"], s["final"]) == (-0.5, -1.0, 1.0, -0.7)
  assert s["drop_then_rise"]
  assert not beta.curve_summary(curve([-0.5, -0.6, -0.7, -0.8]))["drop_then_rise"]  # monotone
  assert not beta.curve_summary(curve([-0.5, -0.4, -0.3]))["drop_then_rise"]  # only rises
  assert not beta.curve_summary(curve([-0.5, -1.5, -1.49]))["drop_then_rise"]  # no real rise


def test_denormalize_inverts_per_patch_normalised_targets():
  x = normalize_images(jnp.asarray(
      np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)))
  for norm_pix, stats in ((True, "per_patch"), (True, "per_channel"), (False, "per_patch")):
    target = pixel_targets(x, 4, norm_pix, stats)[:, None]  # the perfect prediction [B, 1, N, D]
    back = reconstruction.denormalize_patches(target, x, 4, norm_pix, stats)
    np.testing.assert_allclose(back[:, 0], patchify(x, 4), atol=2e-5)


def _tiny_config(dynamic=True):
  c = config_lib.tiny_config()
  c.model.image_size = 16
  c.dds.num_supervised = 2
  c.distill.enabled = False
  c.dds.dynamic = dynamic
  c.dds.beta_init = (-1.0, 0.7)
  c.masking.kind = "random"
  return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny DDAE (pixel branch, dynamic beta) checkpoint in the pretraining layout."""
  config = _tiny_config()
  model = DDAE(config, config_lib.resolve(config))
  params = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0)))
  workdir = tmp_path_factory.mktemp("run")
  ckpt = Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, use_async=False)
  ckpt.save(3, {"step": np.int32(3), "params": params}, data_position=0, force=True)
  ckpt.close()
  (workdir / "config.json").write_text(config.to_json())
  (workdir / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "epoch": s / 4, "beta/shared/block_2": -1.0 + 0.1 * s,
                  "beta/shared/block_4": 0.7 - 0.1 * s}) + "\n" for s in range(1, 4)))
  return workdir, config, params


def test_reconstruct_matches_the_loss_and_eq2(tiny_run):
  _, config, params = tiny_run
  model = DDAE(config, config_lib.resolve(config))
  images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  mask = np.asarray(make_mask(jax.random.key(1), 3, model.grid, 0.75, "random"))
  out = reconstruction.reconstruct(model, params, images, mask)
  k = len(model.blocks)
  assert out["reconstruction"].shape == (3, k, 16, 16, 3)

  # Uniform weights make the loss per block the masked error averaged over images.
  x = normalize_images(jnp.asarray(images))
  dist = distance_map(jnp.asarray(mask), model.grid)
  uniform = _tiny_config(dynamic=False)
  _, metrics = jax.jit(DDAE(uniform, config_lib.resolve(uniform)).loss)(params, x,
                                                                        jnp.asarray(mask), dist)
  for i, g in enumerate(model.blocks):
    np.testing.assert_allclose(out["masked_error"][:, i].mean(), metrics[f"pixel_loss/block_{g}"],
                               rtol=1e-5)

  # Eq. 2 rescaled by its max, in NumPy: exp(D^beta - max D^beta) on masked patches.
  d = np.stack([ndimage.distance_transform_edt(m.reshape(model.grid)).reshape(-1) for m in mask])
  for i, b in enumerate(params["beta"]["shared"]):
    power = np.where(mask, np.where(mask, d, 1.0) ** float(b), -np.inf)
    expected = np.where(mask, np.exp(power - power.max(-1, keepdims=True)), 0.0)
    np.testing.assert_allclose(out["weights"][:, i].reshape(3, -1), expected, rtol=1e-5,
                               atol=1e-7)
  np.testing.assert_allclose(out["distance"].reshape(3, -1), d, rtol=1e-6)

  # Visible patches are the original, masked ones grey in the input panel.
  pixel_mask = np.kron(mask.reshape((3,) + model.grid), np.ones((4, 4))).astype(bool)
  for i in range(k):
    np.testing.assert_allclose(out["reconstruction"][:, i][~pixel_mask], out["image"][~pixel_mask],
                               atol=1e-5)
  assert np.all(out["masked"][pixel_mask] == 0.5)
  np.testing.assert_array_equal(out["masked"][~pixel_mask], out["image"][~pixel_mask])


def test_cli_writes_every_figure_and_its_numbers(tiny_run, tmp_path):
  workdir, config, params = tiny_run
  run = str(workdir)
  common = ["--out", str(tmp_path), "--num_images", "2", "--split", "test"]
  maps = analyze.main(["attention-maps", "--workdir", run, "--workdir", run, "--label", "a",
                       "--label", "b", "--block", "2", *common])
  dist = analyze.main(["attention-distance", "--workdir", run, *common])
  recon = analyze.main(["reconstruct", "--workdir", run, *common])
  curves = analyze.main(["beta", "--workdir", run, "--x", "epoch", "--out", str(tmp_path)])
  fig2 = analyze.main(["distance-maps", "--grid", "14", "--ratios", "0.5,0.9", "--kinds",
                       "random", "--out", str(tmp_path)])
  seeds = []
  for seed, top1 in enumerate(([0.5, 0.6], [0.7, 0.9], [0.6, 0.6])):
    seeds.append(tmp_path / f"seed{seed}")
    seeds[-1].mkdir()
    rows = [{"step": 10, "epoch": 1.0, "loss": 1.0}, {"step": 10, "knn/top1": top1[0]},
            {"step": 20, "epoch": 2.0, "loss": 1.0}, {"step": 20, "knn/top1": top1[1]}]
    (seeds[-1] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  evals = analyze.main(["evals", *(f"--workdir={w}" for w in seeds), *(["--label=ddae"] * 3),
                        "--out", str(tmp_path)])
  for name in analyze.COMMANDS:
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / f"{name}.json").read_text())["seconds_total"] >= 0

  a, b = (np.asarray(maps["checkpoints"][k]["maps"]) for k in "ab")
  np.testing.assert_array_equal(a, b)  # the same checkpoint twice
  assert a.shape == (2, 4, 4) and np.all(a > 0) and np.all(a.sum((1, 2)) < 1)
  d = np.asarray(dist["checkpoints"][workdir.name]["distance"])
  width, depth, heads = config_lib.encoder_dims(config)
  assert d.shape == (depth, heads)
  assert np.all(d > 0) and np.all(d < 4 * math.hypot(3, 3))
  assert recon["step"] == 3 and np.asarray(recon["weights"]).shape == (2, 2, 4, 4)
  group = evals["groups"]["ddae"]
  assert group["epoch"] == [1.0, 2.0] and group["runs"] == [[0.5, 0.6], [0.7, 0.9], [0.6, 0.6]]
  np.testing.assert_allclose(group["mean"], [0.6, 0.7])
  np.testing.assert_allclose(group["std"], np.std([[0.5, 0.6], [0.7, 0.9], [0.6, 0.6]], 0))
  assert (group["min"], group["max"]) == ([0.5, 0.6], [0.7, 0.9])
  assert evals["summary"]["ddae"]["runs"] == 3
  assert curves["runs"][workdir.name]["beta/shared/block_4"]["value"] == pytest.approx(
      [0.6, 0.5, 0.4])
  for p in fig2["panels"]:
    core = distance_map(jnp.asarray(p["mask"]).reshape(1, -1), (14, 14))
    np.testing.assert_allclose(np.asarray(p["distance"]).reshape(-1), core[0], atol=1e-5)
