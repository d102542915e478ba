"""The ViT encoder against timm's VisionTransformer given the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.models.vision_transformer as vision_transformer
import torch
from timm.models import beit as beit_lib

from ddae_jax.models.vit import (
  ViTEncoder,
  patchify,
  relative_position_index,
  sincos_pos_embed,
  unpatchify,
)
from ddae_jax.objectives import masking
from ddae_jax.weights import torch_vit

WIDTH, DEPTH, HEADS, PATCH, SIZE = 64, 4, 4, 4, 32
GRID = (SIZE // PATCH, SIZE // PATCH)


@pytest.fixture(scope="module")
def timm_model():
  torch.manual_seed(0)
  model = vision_transformer.VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH,
                                     depth=DEPTH, num_heads=HEADS, num_classes=0)
  # timm's init leaves biases and norms at 0 / 1: randomise them too, so every
  # weight's layout is exercised.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    # Our position embeddings are MAE's fixed sin-cos table.
    model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(WIDTH, GRID))[None])
  return model.eval()


def _ours(model):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return torch_vit.encoder_params_from_timm(sd, DEPTH)


def _images(seed=0, batch=3):
  return np.random.RandomState(seed).randn(batch, SIZE, SIZE, 3).astype(np.float32)


def _timm_blocks(model, x_nchw, ids_keep=None):
  """timm's own modules, with MAE's visible-token gather between embed and blocks."""
  with torch.no_grad():
    x = model.patch_embed(x_nchw) + model.pos_embed[:, 1:]
    if ids_keep is not None:
      idx = torch.from_numpy(np.array(ids_keep)).long()[..., None].expand(-1, -1, WIDTH)
      x = torch.gather(x, 1, idx)
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    outs = []
    for blk in model.blocks:
      x = blk(x)
      outs.append(x)
    return [o.numpy() for o in outs], model.norm(x).numpy()


def test_full_forward_matches_timm(timm_model):
  images = _images()
  encoder = ViTEncoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                       feature_blocks=(DEPTH,))
  out = encoder.apply({"params": _ours(timm_model)}, jnp.asarray(images))
  with torch.no_grad():
    want = timm_model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert np.max(np.abs(np.asarray(out["final"]) - want)) < 1e-4


def test_visible_tokens_and_intermediate_blocks_match_timm(timm_model):
  images = _images(1)
  mask = masking.blockwise_mask(jax.random.PRNGKey(0), 3, GRID, 0.75, min_patches=4)
  num_visible = GRID[0] * GRID[1] - masking.num_masked(0.75, GRID)
  ids_keep, _ = masking.visible_and_masked_ids(mask, num_visible)
  encoder = ViTEncoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                       feature_blocks=(1, 2, 3, 4), feature_norm="final")
  out = encoder.apply({"params": _ours(timm_model)}, jnp.asarray(images), ids_keep)
  blocks, final = _timm_blocks(timm_model, torch.from_numpy(images).permute(0, 3, 1, 2),
                               ids_keep)
  assert out["hidden"].shape == (3, 4, 1 + num_visible, WIDTH)
  for k in range(4):
    assert np.max(np.abs(np.asarray(out["hidden"][:, k]) - blocks[k])) < 1e-4
  assert np.max(np.abs(np.asarray(out["final"]) - final)) < 1e-4
  # feature_norm="final": every f^(g_i) is the final norm of its block.
  with torch.no_grad():
    normed = timm_model.norm(torch.from_numpy(blocks[1])).numpy()
  assert np.max(np.abs(np.asarray(out["features"][:, 1]) - normed)) < 1e-4


def test_timm_export_roundtrip(timm_model):
  ours = _ours(timm_model)
  back = torch_vit.encoder_params_to_timm(ours, DEPTH, PATCH, GRID)
  sd = timm_model.state_dict()
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_per_block_norms_are_separate_parameters():
  encoder = ViTEncoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                       feature_blocks=(2, 4))
  params = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  assert "feature_norm_2" in params and "norm" in params and "feature_norm_4" not in params


def test_sincos_matches_mae_formula():
  """MAE's get_2d_sincos_pos_embed, transcribed: first half from the column index."""
  d, g = 16, 3
  grid_h, grid_w = np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # MAE: w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, g, g])

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  want = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
  want = np.concatenate([np.zeros([1, d]), want], axis=0)
  np.testing.assert_allclose(sincos_pos_embed(d, (g, g)), want, atol=1e-6)


def test_patchify_roundtrip_and_mae_order():
  images = _images(2, 2)
  patches = np.asarray(patchify(jnp.asarray(images), PATCH))
  # MAE: x.reshape(N, C, h, p, w, q) -> 'nchpwq->nhwpqc' on NCHW images.
  nchw = images.transpose(0, 3, 1, 2).reshape(2, 3, GRID[0], PATCH, GRID[1], PATCH)
  want = np.einsum("nchpwq->nhwpqc", nchw).reshape(2, GRID[0] * GRID[1], PATCH * PATCH * 3)
  np.testing.assert_array_equal(patches, want)
  np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(patches), PATCH, GRID)),
                                images)


# ----------------------------------------------- BEiT's student: shared rel. pos. bias, layer scale
@pytest.fixture(scope="module")
def timm_beit():
  """timm's Beit as BEiT-v2 pretrains it: no absolute positions, one shared table, gamma."""
  torch.manual_seed(1)
  model = beit_lib.Beit(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                         num_heads=HEADS, num_classes=0, use_abs_pos_emb=False,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1)
  with torch.no_grad():  # the table and gammas start at 0 / 0.1: randomise every tensor
    for _, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _beit_encoder(**kw):
  return ViTEncoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                    pos_embed="none", rel_pos_bias=True, layer_scale=0.1, **kw)


def _timm_beit_blocks(model, images, ids_keep=None):
  """timm's own modules; with ids_keep, only those patches (and the bias rows/columns) run."""
  with torch.no_grad():
    x = model.patch_embed(torch.from_numpy(images).permute(0, 3, 1, 2))
    bias = model.rel_pos_bias()[None].expand(x.shape[0], -1, -1, -1)
    if ids_keep is not None:
      keep = torch.from_numpy(np.array(ids_keep)).long()
      x = torch.gather(x, 1, keep[..., None].expand(-1, -1, WIDTH))
      tokens = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)
      rows = torch.gather(bias, 2, tokens[:, None, :, None].expand(-1, HEADS, -1, bias.shape[3]))
      bias = torch.gather(rows, 3, tokens[:, None, None, :].expand(-1, HEADS, tokens.shape[1], -1))
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    outs = []
    for blk in model.blocks:
      x = blk(x, shared_rel_pos_bias=bias)
      outs.append(x.numpy())
    return outs


def test_relative_position_index_is_beits():
  for grid in ((SIZE // PATCH,) * 2, (3, 5)):
    np.testing.assert_array_equal(relative_position_index(grid),
                                  beit_lib.gen_relative_position_index(grid).numpy())


@pytest.mark.parametrize("visible", [False, True])
def test_rel_pos_bias_and_layer_scale_blocks_match_timm_beit(timm_beit, visible):
  """Every block of the BEiT student against timm's Beit blocks on the same weights (float32)."""
  images = _images(4)
  ids_keep = None
  if visible:  # the visible-token path gathers the bias rows and columns of the kept patches
    mask = masking.random_mask(jax.random.PRNGKey(3), 3, GRID, 0.75)
    ids_keep, _ = masking.visible_and_masked_ids(mask, GRID[0] * GRID[1] // 4)
  sd = {k: v.detach().numpy() for k, v in timm_beit.state_dict().items()}
  params = torch_vit.encoder_params_from_beit(sd, DEPTH)
  out = _beit_encoder(feature_blocks=(1, 2, 3, 4), feature_norm="final").apply(
      {"params": params}, jnp.asarray(images), ids_keep)
  want = _timm_beit_blocks(timm_beit, images, ids_keep)
  diffs = [float(np.max(np.abs(np.asarray(out["hidden"][:, k]) - want[k]))) for k in range(DEPTH)]
  assert max(diffs) < 1e-4, diffs
  # The materialised softmax (attention analysis) sees the same bias.
  captured = _beit_encoder(feature_blocks=(DEPTH,), capture_attention=True).apply(
      {"params": params}, jnp.asarray(images), ids_keep)
  assert np.max(np.abs(np.asarray(captured["hidden"][:, 0]) - want[-1])) < 1e-4


def test_beit_options_are_off_by_default_and_start_as_beit():
  images = jnp.zeros((1, SIZE, SIZE, 3))
  plain = ViTEncoder(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS)
  keys = set(plain.init(jax.random.PRNGKey(0), images)["params"]["block_0"])
  assert keys == {"norm1", "attn", "norm2", "mlp"}
  params = _beit_encoder(feature_blocks=(DEPTH,)).init(jax.random.PRNGKey(0), images)["params"]
  assert "pos_embed" not in params
  table = params["rel_pos_bias"]["relative_position_bias_table"]
  assert table.shape == ((2 * GRID[0] - 1) * (2 * GRID[1] - 1) + 3, HEADS) and not table.any()
  np.testing.assert_array_equal(params["block_3"]["gamma_2"], np.full(WIDTH, 0.1, np.float32))
