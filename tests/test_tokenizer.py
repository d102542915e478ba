"""The VQ-KD tokenizer and its converter against PyTorch (timm's BEiT encoder, random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import load
from timm.models import beit

from ddae_jax.models.tokenizer import VQKDTokenizer, tokenizer_input
from ddae_jax.weights import vqkd as tw

WIDTH, DEPTH, HEADS, PATCH, SIZE, CODE, VOCAB = 32, 6, 2, 4, 16, 8, 64  # VIT_SIZES["tiny6"]
DIMS = dict(width=WIDTH, depth=DEPTH, patch_size=PATCH, num_patches=(SIZE // PATCH) ** 2,
            code_dim=CODE, vocab_size=VOCAB)


def torch_vqkd(seed=0):
  """A tiny VQ-KD with every tensor random: (encoder, task layer, codebook, full state dict)."""
  torch.manual_seed(seed)
  encoder = beit.Beit(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                      num_heads=HEADS, num_classes=0, use_abs_pos_emb=True,
                      use_rel_pos_bias=False, init_values=None, global_pool="avg").eval()
  task = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(),
                             torch.nn.Linear(WIDTH, CODE))
  with torch.no_grad():  # every tensor random, biases and norms too, so no mapping hides
    for name, p in list(encoder.named_parameters()) + list(task.named_parameters()):
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0))
  codebook = torch.nn.functional.normalize(torch.randn(VOCAB, CODE), dim=-1)
  sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
  sd.update({f"encode_task_layer.{k}": v for k, v in task.state_dict().items()})
  sd["quantize.embedding.weight"] = codebook
  # What the public file holds besides: the quantiser's training buffers and the decoder.
  sd["quantize.embedding.cluster_size"] = torch.rand(VOCAB)
  sd["quantize.embedding.embed_avg"] = torch.randn(VOCAB, CODE)
  sd["quantize.embedding.initted"] = torch.ones(1)
  sd["quantize.cluster_size"] = torch.rand(VOCAB)
  sd["decoder.blocks.0.attn.qkv.weight"] = torch.randn(3 * WIDTH, WIDTH)
  sd["decode_task_layer.0.weight"] = torch.randn(WIDTH, WIDTH)
  return encoder, task, codebook, sd


def torch_tokens(encoder, task, codebook, images_01):
  """VQ-KD's get_tokens: pre_process, encoder patch tokens + fc_norm, task layer, quantiser."""
  x = torch.from_numpy(images_01).permute(0, 3, 1, 2) * 255.0 / 127.5 - 1.0
  with torch.no_grad():
    tokens = encoder.fc_norm(encoder.forward_features(x)[:, 1:])
    z = torch.nn.functional.normalize(task(tokens), dim=-1)
    d = (z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1)
         - 2 * torch.einsum("bnd,vd->bnv", z, codebook))
  return z.numpy(), d.argmin(-1).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  encoder, task, codebook, sd = torch_vqkd()
  path = str(tmp_path_factory.mktemp("vqkd") / "vqkd.pth")
  torch.save({"model": sd}, path)
  return path, encoder, task, codebook, sd


def test_converter_round_trips_the_state_dict(checkpoint):
  path, _, _, _, sd = checkpoint
  params = tw.load_tokenizer_params(path, **DIMS)
  back = tw.params_to_torch(params, DEPTH, PATCH)
  read = {k for k in sd if not k.startswith(tw.SKIPPED_PREFIXES)}
  assert set(back) == read
  for k in read:
    np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)
  # The tree is exactly the Flax module's.
  model = VQKDTokenizer(PATCH, "tiny6", CODE, VOCAB)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)
  assert shapes(params) == shapes(abstract["params"])


def test_flax_tokenizer_equals_torch(checkpoint):
  path, encoder, task, codebook, _ = checkpoint
  params = tw.load_tokenizer_params(path, **DIMS)
  images = np.random.RandomState(0).randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
  model = VQKDTokenizer(PATCH, "tiny6", CODE, VOCAB)
  out = jax.jit(model.apply)({"params": params}, tokenizer_input(jnp.asarray(images)))
  codes, indices = torch_tokens(encoder, task, codebook, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(out["codes"]), codes, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(out["indices"]), indices)
  assert len(np.unique(indices)) >= 3  # the case exercises the argmin


def test_safetensors_file_reads_the_same(checkpoint, tmp_path):
  from safetensors.torch import save_file
  path, _, _, _, sd = checkpoint
  st = str(tmp_path / "vqkd.safetensors")
  save_file({k: v.contiguous() for k, v in sd.items()}, st)
  a, b = tw.load_tokenizer_params(path, **DIMS), tw.load_tokenizer_params(st, **DIMS)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_mismatch_names_every_bad_tensor(checkpoint, tmp_path):
  _, _, _, _, sd = checkpoint
  bad = dict(sd)
  bad["encoder.pos_embed"] = torch.zeros(1, 5, WIDTH)
  del bad["encoder.blocks.1.attn.v_bias"]
  bad["encoder.head.weight"] = torch.zeros(10, WIDTH)
  path = str(tmp_path / "bad.pth")
  torch.save({"model": bad}, path)
  with pytest.raises(tw.TokenizerMismatch) as err:
    tw.load_tokenizer_params(path, **DIMS)
  msg = str(err.value)
  assert "shape mismatch: encoder.pos_embed expected (1, 17, 32), found (1, 5, 32)" in msg
  assert "missing from the checkpoint: encoder.blocks.1.attn.v_bias (32,)" in msg
  assert "unexpected in the checkpoint: encoder.head.weight (10, 32)" in msg
  assert "3 problems" in msg


def test_unsafe_pickles_are_refused(tmp_path):
  """weights_only=True: a file that would run code on load is rejected, not executed."""
  import os
  import pickle

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = str(tmp_path / "evil.pth")
  torch.save({"model": {"x": Evil()}}, path, pickle_module=pickle)
  with pytest.raises(pickle.UnpicklingError):
    tw.read_state_dict(path)


def test_missing_or_mismatched_checkpoint_fails_before_any_compute(checkpoint, monkeypatch):
  from ddae_jax import config_lib
  from ddae_jax import train_step as ts
  called = []
  monkeypatch.setattr(ts, "create_train_state", lambda *a: called.append(1))
  c = load("configs/beitv2_vitb.py")
  c.tokenizer.checkpoint = "/nonexistent/vqkd.pth"
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer.checkpoint.*nonexistent"):
    ts.build(c, jax.devices()[:8])
  c.tokenizer.checkpoint = checkpoint[0]  # a ViT-B/16 config, a tiny file
  wrong = r"encode_task_layer.0.weight expected \(768, 768\), found \(32, 32\)"
  with pytest.raises(config_lib.ConfigError, match=wrong):
    ts.build(c, jax.devices()[:8])
  assert not called
