"""The public BEiT-v2 tokenizer checkpoint <-> our `VQKDTokenizer` parameters.

The file (`vqkd_encoder_base_decoder_3x768x12_clip-*.pth`, microsoft/unilm
beit2) holds `{"model": state_dict}` with
  encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, fc_norm.*}
    (BEiT's VisionTransformer: attn.qkv.weight without bias, attn.q_bias,
    attn.v_bias; no layer scale; `norm` is the identity)
  encode_task_layer.{0,2}.{weight,bias}        Linear 768->768, Linear 768->32
  quantize.embedding.weight [8192, 32]          the codebook
  quantize.* buffers (cluster sizes, EMA sums)  codebook training only
  decoder.*, decode_task_layer.*                tokenizer training only
Only the first three groups are read; the rest is skipped by name. The file is
read by `ddae_jax/weights/state_dict.py`: `torch.load(weights_only=True)`
(tensors and plain containers only, never arbitrary pickled objects) or as
safetensors.
"""

from __future__ import annotations

import numpy as np

from ddae_jax.weights import state_dict, torch_vit
from ddae_jax.weights.shapes import check_shapes, shapes_of

# Tokenizer-training state we neither need nor export.
SKIPPED_PREFIXES = ("decoder.", "decode_task_layer.", "teacher_model.", "scaling_layer.",
                    "loss", "quantize.cluster_size", "quantize.embedding.cluster_size",
                    "quantize.embedding.embed_avg", "quantize.embedding.initted")


class TokenizerMismatch(ValueError):
  """The checkpoint's names or shapes differ from the tokenizer the config builds."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as NumPy arrays, floats as float32 (`.safetensors` or a torch file).

  Raises state_dict.ConvertError: WeightsFileMissing (an OSError) for a path
  that does not exist, UnsafePickle (a pickle.UnpicklingError) for a file that
  holds objects other than tensors.
  """
  sd = state_dict.read_state_dict(path)
  for key in ("model", "state_dict"):  # what VQ-KD's own loader unwraps
    if isinstance(sd.get(key), dict):
      sd = sd[key]
      break
  return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def expected_shapes(width: int, depth: int, patch_size: int, num_patches: int,
                    code_dim: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor the converter reads."""
  shapes = {
      "encoder.cls_token": (1, 1, width),
      "encoder.pos_embed": (1, num_patches + 1, width),
      "encoder.patch_embed.proj.weight": (width, 3, patch_size, patch_size),
      "encoder.patch_embed.proj.bias": (width,),
      "encoder.fc_norm.weight": (width,), "encoder.fc_norm.bias": (width,),
      "encode_task_layer.0.weight": (width, width), "encode_task_layer.0.bias": (width,),
      "encode_task_layer.2.weight": (code_dim, width), "encode_task_layer.2.bias": (code_dim,),
      "quantize.embedding.weight": (vocab_size, code_dim),
  }
  hidden = 4 * width
  for i in range(depth):
    b = f"encoder.blocks.{i}"
    shapes.update({
        f"{b}.norm1.weight": (width,), f"{b}.norm1.bias": (width,),
        f"{b}.attn.qkv.weight": (3 * width, width),
        f"{b}.attn.q_bias": (width,), f"{b}.attn.v_bias": (width,),
        f"{b}.attn.proj.weight": (width, width), f"{b}.attn.proj.bias": (width,),
        f"{b}.norm2.weight": (width,), f"{b}.norm2.bias": (width,),
        f"{b}.mlp.fc1.weight": (hidden, width), f"{b}.mlp.fc1.bias": (hidden,),
        f"{b}.mlp.fc2.weight": (width, hidden), f"{b}.mlp.fc2.bias": (width,),
    })
  return shapes


def check_state_dict(sd: dict, expected: dict) -> None:
  """Raises TokenizerMismatch listing every missing, unexpected or misshapen tensor.

  Args:
    sd: {name: array} as `read_state_dict` returns it.
    expected: {name: shape} from `expected_shapes`.
  """
  found = {k: v for k, v in shapes_of(sd).items() if not k.startswith(SKIPPED_PREFIXES)}
  check_shapes(found, expected, TokenizerMismatch,
               "the tokenizer checkpoint does not match the configured VQ-KD tokenizer",
               missing="missing from the checkpoint", unexpected="unexpected in the checkpoint")


def check_params(converted: dict, model: dict) -> None:
  """Raises TokenizerMismatch when converted parameters differ from the model's tree.

  Args:
    converted: `params_from_torch`'s tree (NumPy arrays).
    model: the `VQKDTokenizer` parameters the config builds (arrays or ShapeDtypeStructs).
  """
  check_shapes(shapes_of(converted), shapes_of(model), TokenizerMismatch,
               "converted tokenizer parameters differ from the model's",
               missing="missing from the converted parameters",
               unexpected="unexpected in the converted parameters")


def params_from_torch(sd: dict, depth: int) -> dict:
  """`VQKDTokenizer` parameters from a VQ-KD state dict (NumPy arrays, already checked)."""
  enc = {k[len("encoder."):]: np.asarray(v) for k, v in sd.items() if k.startswith("encoder.")}
  for i in range(depth):
    b = f"blocks.{i}.attn"
    # BEiT's attention has a query and a value bias but no key bias.
    enc[f"{b}.qkv.bias"] = np.concatenate(
        [enc[f"{b}.q_bias"], np.zeros_like(enc[f"{b}.q_bias"]), enc[f"{b}.v_bias"]])
  enc["norm.weight"], enc["norm.bias"] = enc["fc_norm.weight"], enc["fc_norm.bias"]
  encoder = torch_vit.encoder_params_from_timm(enc, depth)
  encoder["pos_embed"] = enc["pos_embed"]
  return {
      "encoder": encoder,
      "encode_task_layer_0": torch_vit.dense_from_linear(sd, "encode_task_layer.0"),
      "encode_task_layer_2": torch_vit.dense_from_linear(sd, "encode_task_layer.2"),
      "codebook": np.asarray(sd["quantize.embedding.weight"]),
  }


def params_to_torch(params: dict, depth: int, patch_size: int) -> dict[str, np.ndarray]:
  """The inverse of `params_from_torch`: the state dict entries it reads."""
  enc = params["encoder"]
  width = np.shape(enc["patch_embed"]["kernel"])[1]
  timm_sd = torch_vit.encoder_params_to_timm(enc, depth, patch_size, (1, 1))
  timm_sd["pos_embed"] = np.asarray(enc["pos_embed"])
  timm_sd["fc_norm.weight"] = timm_sd.pop("norm.weight")
  timm_sd["fc_norm.bias"] = timm_sd.pop("norm.bias")
  for i in range(depth):
    bias = timm_sd.pop(f"blocks.{i}.attn.qkv.bias")
    if np.any(bias[width:2 * width] != 0):
      raise TokenizerMismatch(f"block {i}: a VQ-KD tokenizer has no key bias, found one")
    timm_sd[f"blocks.{i}.attn.q_bias"] = bias[:width]
    timm_sd[f"blocks.{i}.attn.v_bias"] = bias[2 * width:]
  sd = {f"encoder.{k}": v for k, v in timm_sd.items()}
  for ours, theirs in (("encode_task_layer_0", "encode_task_layer.0"),
                       ("encode_task_layer_2", "encode_task_layer.2")):
    sd[f"{theirs}.weight"] = np.asarray(params[ours]["kernel"]).T
    sd[f"{theirs}.bias"] = np.asarray(params[ours]["bias"])
  sd["quantize.embedding.weight"] = np.asarray(params["codebook"])
  return sd


def load_tokenizer_params(path: str, *, width: int, depth: int, patch_size: int,
                          num_patches: int, code_dim: int, vocab_size: int) -> dict:
  """Reads, checks and converts a tokenizer checkpoint.

  Raises TokenizerMismatch, or `read_state_dict`'s errors.
  """
  sd = read_state_dict(path)
  check_state_dict(sd, expected_shapes(width, depth, patch_size, num_patches, code_dim,
                                       vocab_size))
  return params_from_torch(sd, depth)
