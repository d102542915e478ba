"""timm/MAE interop: export loads strictly into timm with the same features, import
reproduces timm's forward, round trips are exact, wrong files fail with names and shapes."""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import timm.models.vision_transformer as vision_transformer
import torch
from repo_paths import REPO
from safetensors.numpy import load_file, save_file
from timm.layers import resample_abs_pos_embed

from ddae_jax import config_checks, config_lib
from ddae_jax.methods.ddae import DDAE
from ddae_jax.models.vit import VIT_SIZES, sincos_pos_embed
from ddae_jax.weights import convert, pretrained, torch_vit

WIDTH, DEPTH, HEADS = 64, 4, 4  # the "tiny" size


def _randomise(model, seed=0):
  """timm leaves biases / norms at 0 / 1: randomise every tensor, pos_embed included."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _timm(patch=8, size=32, **kw):
  return _randomise(vision_transformer.VisionTransformer(
      img_size=size, patch_size=patch, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, **kw))


def _numpy_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def _nchw(images):
  return torch.from_numpy(images).permute(0, 3, 1, 2)


def _consumer_forward(workdir, images):
  """What the evaluation binaries do: config.json -> model, checkpoint -> params."""
  config = pretrained.load_config(workdir)
  config_checks.validate(config)
  config.model.dtype = "float32"
  encoder = DDAE(config, config_lib.resolve(config)).encoder
  params, _ = pretrained.load_encoder(workdir, "online")
  expected = jax.eval_shape(encoder.init, jax.random.key(0), jnp.asarray(images[:1]))
  pretrained.check_encoder(params, expected["params"])
  # jit: one compile beats eager Flax's op-by-op compiles about 3x on the CPU.
  return np.asarray(jax.jit(encoder.apply)({"params": params}, jnp.asarray(images))["final"])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A random timm ViT (patch 8, 32 px) saved as safetensors and imported."""
  model = _timm(num_classes=0)
  root = tmp_path_factory.mktemp("imported")
  save_file(_numpy_sd(model), str(root / "timm.safetensors"))
  summary = convert.import_checkpoint(root / "timm.safetensors", root / "run")
  return model, root, summary


def test_import_then_our_forward_equals_timm(imported):
  model, root, summary = imported
  assert (summary["size"], summary["patch_size"], summary["image_size"]) == ("tiny", 8, 32)
  assert pretrained.load_config(root / "run").model.pos_embed == "learned"
  images = _images()
  ours = _consumer_forward(root / "run", images)
  with torch.no_grad():
    want = model.forward_features(_nchw(images)).numpy()
  assert np.max(np.abs(ours - want)) < 1e-4


def test_cli_export_of_an_import_reproduces_the_tensors_exactly(imported):
  """The one subprocess test: the CLI as users run it."""
  _, root, _ = imported
  out = root / "again.safetensors"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-m", "ddae_jax.convert", "export",
                  f"--workdir={root / 'run'}", f"--out={out}"], check=True, env=env,
                 cwd=REPO, capture_output=True, timeout=300)
  original, again = load_file(str(root / "timm.safetensors")), load_file(str(out))
  assert sorted(again) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


@pytest.fixture(scope="module")
def pretraining_run(tmp_path_factory):
  """A tiny pretraining-layout run (sin-cos table, per-block feature norms)."""
  config = config_lib.tiny_config()
  encoder = DDAE(config, config_lib.resolve(config)).encoder
  # Random values for every parameter (shapes only from init: no compile).
  shapes = jax.eval_shape(encoder.init, jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(tree, [(0.1 * rng.normal(size=x.shape) + (x.shape == (WIDTH,)))
                                     .astype(np.float32) for x in leaves])
  assert "feature_norm_1" in params and "pos_embed" not in params
  root = tmp_path_factory.mktemp("pretrained")
  pretrained.save_encoder(root, params, config, step=3)
  images = _images()
  out = jax.jit(encoder.apply)({"params": params}, jnp.asarray(images))
  return root, images, np.asarray(out["final"]), np.asarray(out["hidden"][:, -1])


def test_export_loads_strictly_into_timm_with_the_same_features(pretraining_run, tmp_path):
  root, images, ours, _ = pretraining_run
  summary = convert.export_checkpoint(root, tmp_path / "vit.pth", "ema")
  assert summary["step"] == 3 and summary["dropped"] == ["feature_norm_1", "feature_norm_2",
                                                         "feature_norm_3"]
  model = vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=WIDTH,
                                               depth=DEPTH, num_heads=HEADS, num_classes=0)
  model.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)
  with torch.no_grad():
    want = model.eval().forward_features(_nchw(images)).numpy()
  assert np.max(np.abs(ours - want)) < 1e-4


def test_mae_layouts_load_strictly_with_head_and_global_pool(pretraining_run, tmp_path):
  root, images, ours, last_block = pretraining_run
  convert.export_checkpoint(root, tmp_path / "mae.safetensors", layout="mae_vit",
                            num_classes=10)
  sd = load_file(str(tmp_path / "mae.safetensors"))
  assert "fc_norm.weight" in sd and "norm.weight" not in sd and not sd["head.weight"].any()
  # timm's global_pool="avg" has MAE models_vit's keys (fc_norm, no norm, head).
  model = vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=WIDTH,
                                               depth=DEPTH, num_heads=HEADS, num_classes=10,
                                               global_pool="avg")
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    pooled = model.eval().forward_head(model.forward_features(_nchw(images)), pre_logits=True)
  # fc_norm(mean of the raw patch tokens) carries our final norm's affine.
  w, b = sd["fc_norm.weight"], sd["fc_norm.bias"]
  raw = last_block[:, 1:].mean(axis=1)  # [B, D], before any norm
  mu, var = raw.mean(-1, keepdims=True), raw.var(-1, keepdims=True)
  assert np.max(np.abs((raw - mu) / np.sqrt(var + 1e-6) * w + b - pooled.numpy())) < 1e-4

  # MAE's pretraining checkpoint: {"model": ...}, decoder keys that import drops.
  convert.export_checkpoint(root, tmp_path / "mae_pretrain.pth", layout="mae_pretrain")
  raw_ckpt = torch.load(tmp_path / "mae_pretrain.pth", weights_only=True)
  assert set(raw_ckpt) == {"model"} and "norm.weight" in raw_ckpt["model"]
  raw_ckpt["model"]["decoder_embed.weight"] = torch.zeros(32, WIDTH)
  raw_ckpt["model"]["mask_token"] = torch.zeros(1, 1, 32)
  torch.save(raw_ckpt, tmp_path / "with_decoder.pth")
  summary = convert.import_checkpoint(tmp_path / "with_decoder.pth", tmp_path / "run")
  assert any("decoder_embed.weight (32, 64)" in n for n in summary["notes"])
  # The same encoder came back: the pretraining table as a learned one, no feature norms.
  back, _ = pretrained.load_encoder(tmp_path / "run")
  params, _ = pretrained.load_encoder(root)
  params = {k: v for k, v in params.items() if not k.startswith("feature_norm_")}
  np.testing.assert_array_equal(back.pop("pos_embed"), sincos_pos_embed(WIDTH, (8, 8))[None])
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224",
                                  "vit_large_patch16_224"])
def test_layout_names_and_shapes_are_timms_and_maes(name):
  size = name.split("_")[1]
  width, depth, _ = VIT_SIZES[size]
  with torch.device("meta"):  # shapes only, no initialisation
    plain = timm.create_model(name, num_classes=0)
    pooled = timm.create_model(name, num_classes=1000, global_pool="avg")
  for model, layout, classes in ((plain, "timm", 0), (pooled, "mae_vit", 1000)):
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert torch_vit.timm_shapes(width, depth, 16, 196, layout, classes) == want


@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((14, 14), (24, 24)), ((6, 6), (3, 5))])
def test_pos_embed_resampling_matches_timm(old, new):
  pos = np.random.default_rng(0).normal(size=(1, 1 + old[0] * old[1], 16)).astype(np.float32)
  want = resample_abs_pos_embed(torch.from_numpy(pos), list(new), list(old)).numpy()
  got = torch_vit.resample_pos_embed(pos, new, old)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  assert got.shape == want.shape and np.max(np.abs(got - want)) < 1e-5


def test_import_at_a_larger_image_size_resamples_like_timm(imported, tmp_path):
  model, root, _ = imported
  summary = convert.import_checkpoint(root / "timm.safetensors", tmp_path / "run48",
                                      image_size=48)
  assert any("4x4 to a 6x6" in n for n in summary["notes"])
  config = pretrained.load_config(tmp_path / "run48")
  assert config.model.image_size == 48
  big, _ = pretrained.load_encoder(tmp_path / "run48")
  encoder = DDAE(config, config_lib.resolve(config)).encoder
  expected = jax.eval_shape(encoder.init, jax.random.key(0),
                            jnp.zeros((1, 48, 48, 3)))["params"]
  pretrained.check_encoder(big, expected)  # what a consumer at 48 px builds
  want = resample_abs_pos_embed(model.pos_embed.detach(), [6, 6]).numpy()  # timm's recipe
  assert np.max(np.abs(big.pop("pos_embed") - want)) < 1e-5
  # Everything else is the 32 px import, whose forward equals timm's (above).
  small, _ = pretrained.load_encoder(root / "run")
  small.pop("pos_embed")
  jax.tree.map(np.testing.assert_array_equal, big, small)


def test_wrong_architecture_and_missing_keys_list_names_and_shapes(imported, tmp_path):
  _, root, _ = imported
  sd = load_file(str(root / "timm.safetensors"))
  with pytest.raises(SystemExit, match=r"(?s)not a ViT-small/8 \(384 wide, 12 blocks\).*holds "
                     r"a ViT 64 wide, 4 blocks, patch 8.*shape mismatch: blocks.0.attn.qkv."
                     r"weight expected \(1152, 384\), found \(192, 64\).*and \d+ more"):
    convert.main(["import", f"--from={root / 'timm.safetensors'}", f"--out={tmp_path / 'a'}",
                  "--size=small"])
  del sd["blocks.1.attn.qkv.weight"]
  sd["blocks.0.ls1.gamma"] = np.ones(WIDTH, np.float32)  # layer scale: not our ViT
  save_file(sd, str(tmp_path / "broken.safetensors"))
  with pytest.raises(SystemExit) as err:
    convert.main(["import", f"--from={tmp_path / 'broken.safetensors'}", f"--out={tmp_path}/b"])
  msg = str(err.value)
  assert "missing: blocks.1.attn.qkv.weight (192, 64)" in msg
  assert "unexpected: blocks.0.ls1.gamma (64,)" in msg
  with pytest.raises(SystemExit, match="unknown file type '.npz'"):
    convert.main(["import", f"--from={tmp_path / 'w.npz'}", f"--out={tmp_path / 'c'}"])
  with pytest.raises(SystemExit, match="does not exist"):
    convert.main(["export", f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'x.pth'}"])
  with pytest.raises(SystemExit, match="one flat dict"):
    convert.main(["export", f"--workdir={root / 'run'}", f"--out={tmp_path / 'x.safetensors'}",
                  "--layout=mae_pretrain"])


def test_reads_bfloat16_safetensors_and_refuses_pickled_objects(tmp_path):
  from safetensors.torch import save_file as torch_save_file  # pylint: disable=C0415
  weights = torch.randn(3, 5).to(torch.bfloat16)
  torch_save_file({"w": weights}, str(tmp_path / "bf16.safetensors"))
  got = convert.read_state_dict(tmp_path / "bf16.safetensors")["w"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, weights.float().numpy())
  # MAE's training checkpoints carry an argparse.Namespace: not unpickled.
  torch.save({"model": {"w": weights}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "t.pth")
  with pytest.raises(SystemExit, match="objects other than tensors.*argparse.Namespace"):
    convert.main(["import", f"--from={tmp_path / 't.pth'}", f"--out={tmp_path / 'run'}"])


def test_beit_student_exports_strictly_into_timms_beit_with_the_same_features(tmp_path):
  """A BEiT-v2 student (shared table, layer scale, no pos_embed) as timm's Beit, float32."""
  config = config_lib.tiny_config()
  config.method, config.model.feature_norm = "beitv2", "final"
  config.model.pos_embed, config.model.rel_pos_bias, config.model.layer_scale = "none", True, 0.1
  config.tokenizer.size, config.tokenizer.patch_size, config.tokenizer.random_weights = (
      "tiny", 4, True)
  encoder = DDAE(config, config_lib.resolve(config)).encoder
  mask = jnp.zeros((1, 64), bool)
  shapes = jax.eval_shape(encoder.init, jax.random.key(1), jnp.zeros((1, 32, 32, 3)),
                          mask=mask)["params"]
  assert {"rel_pos_bias", "mask_token"} <= set(shapes) and "pos_embed" not in shapes
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(2)
  params = jax.tree.unflatten(tree, [(0.1 * rng.normal(size=x.shape) + (x.shape == (WIDTH,)))
                                     .astype(np.float32) for x in leaves])
  pretrained.save_encoder(tmp_path / "run", params, config, step=5)
  images = _images()
  out = jax.jit(encoder.apply)({"params": params}, jnp.asarray(images))
  with pytest.raises(convert.ConvertError, match="--layout=beit"):
    convert.export_checkpoint(tmp_path / "run", tmp_path / "vit.safetensors")
  summary = convert.export_checkpoint(tmp_path / "run", tmp_path / "beit.pth", layout="beit",
                                      num_classes=10)
  assert summary["dropped"] == ["mask_token"] and "timm.models.beit.Beit(" in summary["create"]
  model = timm.models.beit.Beit(img_size=32, patch_size=4, embed_dim=WIDTH, depth=DEPTH,
                                num_heads=HEADS, num_classes=10, use_abs_pos_emb=False,
                                use_rel_pos_bias=True, init_values=0.1)
  model.load_state_dict(torch.load(tmp_path / "beit.pth", weights_only=True), strict=True)
  with torch.no_grad():
    tokens = model.eval().forward_features(_nchw(images))  # raw: its norm is the identity
    pooled = model.forward_head(tokens, pre_logits=True).numpy()
  last_block = np.asarray(out["hidden"][:, -1])
  assert np.max(np.abs(last_block - tokens.numpy())) < 1e-4
  # fc_norm (mean pooling) carries our final norm's affine, as in the mae_vit layout.
  raw = last_block[:, 1:].mean(axis=1)
  mu, var = raw.mean(-1, keepdims=True), raw.var(-1, keepdims=True)
  w, b = params["norm"]["scale"], params["norm"]["bias"]
  assert np.max(np.abs((raw - mu) / np.sqrt(var + 1e-6) * w + b - pooled)) < 1e-4
  # The importer's inverse gives back the encoder (less the key bias, which attention ignores).
  sd = {k: v.numpy() for k, v in torch.load(tmp_path / "beit.pth", weights_only=True).items()
        if not k.startswith("head.")}
  back = torch_vit.encoder_params_from_beit(sd, DEPTH)
  qkv = params["block_0"]["attn"]["qkv"]["bias"]
  np.testing.assert_array_equal(back["block_0"]["attn"]["qkv"]["bias"],
                                np.concatenate([qkv[:WIDTH], np.zeros(WIDTH), qkv[2 * WIDTH:]]))
  np.testing.assert_array_equal(back["rel_pos_bias"]["relative_position_bias_table"],
                                params["rel_pos_bias"]["relative_position_bias_table"])


def test_beit_layout_shapes_are_timms_beit_base():
  with torch.device("meta"):
    model = timm.create_model("beit_base_patch16_224", num_classes=1000)
  want = {k: tuple(v.shape) for k, v in model.state_dict().items()
          if not k.endswith("relative_position_index")}
  assert torch_vit.beit_shapes(768, 12, 16, (14, 14), 12, 1000) == want
