"""Input: image folders with a corrupt file, deterministic per-process order, crops."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from ddae_jax import sharding
from ddae_jax.data import augment, pipeline, sources


def _image_folder(root, per_class=6, corrupt=1):
  rng = np.random.default_rng(0)
  for cls in ("cat", "dog"):
    d = os.path.join(root, "train", cls)
    os.makedirs(d)
    for i in range(per_class):
      size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
      img = (rng.random(size + (3,)) * 255).astype(np.uint8)
      Image.fromarray(img).save(os.path.join(d, f"{i}.jpg"), quality=90)
  for i in range(corrupt):
    with open(os.path.join(root, "train", "cat", f"broken_{i}.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  return root


def test_image_folder_skips_and_counts_a_corrupt_file(tmp_path):
  root = _image_folder(str(tmp_path / "folder"))
  builder = sources.image_folder_builder(root)
  source = sources.TfdsSource(builder, "train", seed=0, shuffle_buffer=64)
  assert source.num_examples == 13
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:2])
  loader = pipeline.TrainLoader(source, sharding.batch_sharding(mesh), local_batch=4,
                                image_size=32, seed=0, workers=2)
  batches = [next(loader) for _ in range(6)]  # 24 good images: nearly 2 epochs
  loader.close()
  assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  assert batches[0]["image"].dtype == np.uint8
  # One corrupt file per epoch passed: counted, never fatal.
  assert 1 <= loader.skipped <= 2
  assert loader.position == 24 + loader.skipped


@pytest.mark.slow  # a compiling subprocess; the corrupt-file count is tested without one
def test_image_folder_trains(tmp_path):
  """The trainer on an image folder with a corrupt file runs its steps."""
  import trainer_utils as tu
  root = _image_folder(str(tmp_path / "folder"), per_class=10)
  proc = tu.run(tu.main_cmd(str(tmp_path / "run"), "--config.data.source=image_folder",
                            f"--config.data.folder={root}", "--config.batch_size=8",
                            "--config.epochs=2", "--config.log_every_steps=1"), 1)
  assert proc.returncode == 0, proc.stdout[-3000:]
  import json
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")
          if '"loss"' in line]
  assert len(rows) == 5 and rows[-1]["skipped_images"] >= 1  # 21 files, 8 a step


def test_array_source_global_batch_is_independent_of_process_count():
  images = np.arange(10)[:, None, None, None].repeat(2, 1).astype(np.uint8)
  labels = np.arange(10)
  one = sources.ArraySource(images, labels, seed=3, local_batch=4)
  recs = [next(r)[3] for r in [one.records(0)] for _ in range(1)]
  stream = one.records(0)
  single = [next(stream)[3] for _ in range(12)]  # three global batches of 4
  halves = []
  for p in range(2):
    s = sources.ArraySource(images, labels, seed=3, local_batch=2, process_index=p,
                            process_count=2).records(0)
    halves.append([next(s)[3] for _ in range(6)])
  merged = sum(([*halves[0][i:i + 2], *halves[1][i:i + 2]] for i in range(0, 6, 2)), [])
  assert merged == single and recs[0] == single[0]
  # Each epoch is a permutation; resuming mid-stream continues identically.
  assert sorted(single[:10]) == list(range(10))
  resumed = one.records(5)
  assert [next(resumed)[3] for _ in range(7)] == single[5:]


def test_random_resized_crop_box_is_valid():
  rng = np.random.default_rng(0)
  for _ in range(200):
    w, h = int(rng.integers(10, 300)), int(rng.integers(10, 300))
    left, top, right, bottom = augment.random_resized_crop_box(rng, w, h, (0.2, 1.0))
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
  view = augment.pretrain_view(np.zeros((50, 70, 3), np.uint8), rng, 32)
  assert view.shape == (32, 32, 3) and view.dtype == np.uint8
  assert augment.center_view(np.zeros((50, 70, 3), np.uint8), 32).shape == (32, 32, 3)


def test_digits_is_real_and_labelled():
  train_x, train_y = sources.digits("train", 32)
  test_x, test_y = sources.digits("test", 32)
  assert train_x.shape == (1497, 32, 32, 3) and test_x.shape == (300, 32, 32, 3)
  assert set(train_y) == set(range(10)) and train_x.max() > 200


def test_color_jitter_is_torchvisions_and_off_draws_nothing():
  """BEiT's ColorJitter(0.4, 0.4, 0.4): our draws replayed through torchvision's functional ops."""
  tvf = pytest.importorskip("torchvision.transforms.functional")
  img = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
  ours = np.asarray(augment.color_jitter(img, np.random.default_rng(7), 0.4))
  twin = np.random.default_rng(7)
  factors, order = twin.uniform(0.6, 1.4, size=3), twin.permutation(3)
  ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  want = img
  for i in order:
    want = ops[i](want, float(factors[i]))
  np.testing.assert_array_equal(ours, np.asarray(want))
  assert not np.array_equal(ours, np.asarray(img))
  # jitter = 0 consumes no randomness: the crops and flips of a run without it.
  rng = np.random.default_rng(3)
  augment.pretrain_view(np.asarray(img), rng, 32)
  plain_next = rng.random()
  rng = np.random.default_rng(3)
  augment.pretrain_view(np.asarray(img), rng, 32, jitter=0.0)
  assert rng.random() == plain_next
