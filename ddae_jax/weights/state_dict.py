"""PyTorch-ecosystem weights files <-> {name: NumPy array}: safetensors and torch pickles.

Every converter reads and writes through here: `convert` (timm/MAE encoders)
and `vqkd` (BEiT-v2's tokenizer). torch is imported only for `.pth`/`.pt`/`.bin`
files, and loads tensors and plain containers only (weights_only=True), never
arbitrary pickled objects.
"""

from __future__ import annotations

import io
import pickle

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

SAFETENSORS = (".safetensors",)
TORCH = (".pth", ".pt", ".bin")


class ConvertError(ValueError):
  """A setting or file the converters cannot use; the message says why."""


class WeightsFileMissing(ConvertError, FileNotFoundError):
  """The weights file does not exist (an OSError too, as open() would raise)."""


class UnsafePickle(ConvertError, pickle.UnpicklingError):
  """A torch file holds objects other than tensors, which weights_only=True refuses."""


def suffix(path) -> str:
  """The file type of `path` (".safetensors", ".pth", ...); ConvertError for others."""
  ext = epath.Path(path).suffix.lower()
  if ext not in SAFETENSORS + TORCH:
    raise ConvertError(f"{path}: unknown file type {ext or '(none)'!r}: allowed "
                       f"{SAFETENSORS + TORCH}")
  return ext


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConvertError(".pth files need PyTorch (pip install torch); "
                       "use a .safetensors file instead") from None
  return torch


def _to_numpy(tree):
  """Tensors and arrays (nested in dicts) to NumPy, floats as float32; other leaves kept."""
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  if hasattr(tree, "detach"):  # a torch tensor
    t = tree.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
  if isinstance(tree, np.ndarray) and (np.issubdtype(tree.dtype, np.floating)
                                       or tree.dtype == ml_dtypes.bfloat16):
    return tree.astype(np.float32, copy=False)
  return tree


# safetensors' dtype names (its format's spec) -> NumPy; bfloat16 is ml_dtypes'.
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(data: bytes) -> dict:
  """{name: array} of a safetensors file's bytes, bfloat16 (which NumPy lacks) as ml_dtypes'."""
  try:
    return safetensors.numpy.load(data)
  except (TypeError, KeyError):  # NumPy has no 'BF16'
    pass
  return {name: np.frombuffer(t["data"], _SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
          for name, t in safetensors.deserialize(data)}


def read_state_dict(path) -> dict:
  """{name: array} (possibly nested, e.g. MAE's {"model": ...}) from a weights file.

  Floating-point tensors come back as float32, the dtype of our parameters.

  Raises:
    ConvertError: an unknown file type, no PyTorch for a torch file, or no
      dict inside; WeightsFileMissing (also an OSError) when `path` does not
      exist; UnsafePickle (also a pickle.UnpicklingError) for pickled objects.
  """
  ext = suffix(path)
  if not epath.Path(path).exists():
    raise WeightsFileMissing(f"{path} does not exist")
  # Whole files through epath, so gs:// works as local paths do (the libraries'
  # own file functions take local paths only).
  data = epath.Path(path).read_bytes()
  if ext in SAFETENSORS:
    return _to_numpy(_read_safetensors(data))
  torch = _torch()
  try:
    raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    # weights_only refuses arbitrary objects (MAE's training checkpoints hold
    # an argparse.Namespace): never unpickle code from a downloaded file.
    why = next((line for line in str(err).splitlines() if "Unsupported global" in line),
               str(err).splitlines()[0])
    raise UnsafePickle(
        f"{path} holds objects other than tensors, which are not loaded (weights_only=True): "
        f"{why.strip()} If you trust the file, save its state dict alone: "
        "torch.save(torch.load(PATH, weights_only=False)['model'], 'clean.pth')") from None
  if not isinstance(raw, dict):
    raise ConvertError(f"{path} holds a {type(raw).__name__}, not a state dict")
  return _to_numpy(raw)


def write_state_dict(sd: dict, path, nest_under: str | None = None,
                     metadata: dict | None = None) -> None:
  """Writes {name: float32 array}; `nest_under="model"` gives MAE's {"model": sd} (.pth)."""
  ext = suffix(path)
  if ext in SAFETENSORS:
    if nest_under:
      raise ConvertError("a safetensors file is one flat dict: write nested layouts to .pth")
    data = safetensors.numpy.save(sd, metadata={"format": "pt", **(metadata or {})})
  else:
    torch = _torch()
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    buffer = io.BytesIO()
    torch.save({nest_under: tensors} if nest_under else tensors, buffer)
    data = buffer.getvalue()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)  # one object on gs://: a reader never sees half a file there
