"""Every pretraining config field reaches the run: a field that is validated but
never used (as masking.min_patches once was) fails here.

The test records every read of a ConfigDict field while the trainer validates
nothing (validation and serialisation reads are not counted), builds the model,
creates the data source and trains two steps, then asserts that every field of
the default DDAE config was read, except the short list below.
"""

import ml_collections
import pytest
from helpers import load

from ddae_jax import config_checks, train

# Fields this run cannot read, each with the reason.
NOT_READ_BY_DDAE = {
    # BEiT-v2's frozen tokenizer (method = "beitv2"); DDAE has none.
    "tokenizer.size", "tokenizer.patch_size", "tokenizer.code_dim", "tokenizer.vocab_size",
    "tokenizer.checkpoint", "tokenizer.random_weights",
    # BEiT-v2's class-token pretraining head (method = "beitv2").
    "cls_pt.early_block", "cls_pt.head_depth",
    # The fallback dataset size for Python callers that pass none: the trainer
    # passes its source's size to the step arithmetic instead (issue 14).
    "num_train_images",
    # Read by the TFDS and image-folder sources only (this run uses synthetic data).
    "data.name", "data.data_dir", "data.folder", "data.shuffle_buffer",
}


def _paths(config, prefix=""):
  """{id(sub-ConfigDict): its dotted prefix} and the dotted names of all leaf fields."""
  owners, leaves = {id(config): prefix}, []
  for key in config.keys():
    value = config._fields[key]  # no __getitem__: not a read
    if isinstance(value, ml_collections.ConfigDict):
      sub_owners, sub_leaves = _paths(value, f"{prefix}{key}.")
      owners.update(sub_owners)
      leaves += sub_leaves
    else:
      leaves.append(prefix + key)
  return owners, leaves


@pytest.mark.slow  # compiles and runs the trainer (~40 s)
def test_every_pretraining_field_is_read(tmp_path, monkeypatch):
  config = load("configs/vitb.py")
  # The paper's method on a ViT the CPU can step (writes, not reads).
  config.model.size, config.model.patch_size, config.model.image_size = "tiny", 4, 32
  config.model.dtype = "float32"
  config.masking.min_patches, config.masking.max_patches = 4, 20
  config.pixel.decoder_width, config.pixel.decoder_heads = 32, 4
  config.batch_size, config.epochs = 16, 1.0
  config.data.source, config.data.synthetic_size, config.data.workers = "synthetic", 32, 2
  config.optim.warmup_epochs = 0.5
  config.log_every_steps = 1
  owners, leaves = _paths(config)

  reads, paused = set(), [0]
  getitem = ml_collections.ConfigDict.__getitem__

  def recording_getitem(self, key):
    value = getitem(self, key)
    if not paused[0] and id(self) in owners:
      reads.add(owners[id(self)] + key)
    return value

  def pausing(fn):
    def wrapped(*args, **kwargs):
      paused[0] += 1
      try:
        return fn(*args, **kwargs)
      finally:
        paused[0] -= 1
    return wrapped

  monkeypatch.setattr(ml_collections.ConfigDict, "__getitem__", recording_getitem)
  # Checking or writing down a field is not using it.
  monkeypatch.setattr(config_checks, "validate", pausing(config_checks.validate))
  monkeypatch.setattr(ml_collections.ConfigDict, "to_dict",
                      pausing(ml_collections.ConfigDict.to_dict))
  monkeypatch.setattr(ml_collections.ConfigDict, "to_json_best_effort",
                      pausing(ml_collections.ConfigDict.to_json_best_effort))
  train.train_and_evaluate(config, str(tmp_path / "run"))

  assert NOT_READ_BY_DDAE <= set(leaves), NOT_READ_BY_DDAE - set(leaves)
  unread = sorted(set(leaves) - reads - NOT_READ_BY_DDAE)
  assert not unread, f"config fields no part of the run reads: {unread}"
  # The exceptions are real: none of them was read either.
  assert not (reads & NOT_READ_BY_DDAE), reads & NOT_READ_BY_DDAE
