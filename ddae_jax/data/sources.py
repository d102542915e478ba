"""Where training images come from: TFDS datasets, image folders, embedded data.

A source yields this process's share of an endless, deterministic stream of
(record number, augmentation key, raw image, label, name) records, starting at
a given record count, so a resumed run
continues exactly where the checkpoint left off. Raw images are encoded bytes
(TFDS, folders) or uint8 arrays (embedded data); `augment.decode` reads both.

TFDS and tensorflow are imported only by the TFDS sources, so embedded and
synthetic data work where tensorflow is absent.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np

SOURCES = ("tfds", "image_folder", "digits", "synthetic")

IMAGENET_HELP = """\
TFDS dataset {name!r} is not prepared in {data_dir!r}.
ImageNet cannot be downloaded automatically. To prepare it:
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
     https://image-net.org/download-images (free account needed).
  2. Put both files in {manual_dir}
  3. Run: tfds build imagenet2012 --data_dir={data_dir}
     (about 150 GB of disk, a few hours; or copy an already prepared
     tensorflow_datasets/imagenet2012 folder there, e.g. from a GCS bucket).
Then point the run at it with --config.data.data_dir={data_dir} (a gs:// path
works), or train on your own images with --config.data.source=image_folder
--config.data.folder=/path/with/train/<class>/<image> subfolders."""


class DatasetMissing(FileNotFoundError):
  """The configured dataset is not on disk; the message says how to get it."""


class InputUnreadable(RuntimeError):
  """Too many images in a row could not be decoded; the message names the data."""


class ArraySource:
  """Images held in memory, shuffled per epoch; global batch order is fixed.

  Global step t reads stream positions [t * G, (t + 1) * G) of the epoch
  permutations; process p takes the slice [p * L, (p + 1) * L) of each, so the
  global batch is the same whatever the number of processes.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, local_batch: int,
               process_index: int = 0, process_count: int = 1):
    self.images, self.labels = images, labels
    self.num_examples = len(images)
    self.description = f"{len(images)} in-memory images"
    self.seed, self.local_batch = seed, local_batch
    self.process_index, self.process_count = process_index, process_count

  def _global_position(self, record: int) -> int:
    step, offset = divmod(record, self.local_batch)
    return (step * self.process_count + self.process_index) * self.local_batch + offset

  def records(self, start: int) -> Iterator[tuple[int, tuple, np.ndarray, int, str]]:
    """(record number, key, image, label, name) for this process from record `start` on.

    The key, which seeds the record's augmentation, is its global stream
    position, so crops do not depend on the number of processes either.
    """
    perms = {}
    record = start
    while True:
      position = self._global_position(record)
      epoch, i = divmod(position, self.num_examples)
      if epoch not in perms:
        perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
            self.num_examples)}
      j = perms[epoch][i]
      yield record, (position,), self.images[j], int(self.labels[j]), f"image {j}"
      record += 1


def digits(split: str = "train", size: int = 32):
  """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), as RGB.

  Ships inside scikit-learn, so it needs no download. Every 6th image is held
  out as the test split (300 images); the rest (1,497) is the train split.

  Returns:
    (uint8[n, size, size, 3], int32[n] labels).
  """
  from PIL import Image
  from sklearn.datasets import load_digits
  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
  data = load_digits()
  keep = (np.arange(len(data.images)) % 6 == 0) == (split == "test")
  small = (data.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in small])
  return np.repeat(images[..., None], 3, axis=-1), data.target[keep].astype(np.int32)


def synthetic(num: int, size: int, seed: int = 0):
  """Deterministic smooth random colour images with random labels (benchmarks, tests)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  small = (rng.random((num, 4, 4, 3)) * 255).astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in small])
  return images, rng.integers(0, 10, num).astype(np.int32)


class TfdsSource:
  """A TFDS split (or an ImageFolder) read as raw bytes, this process's shard only.

  Order: epoch e reads the shard with its files and records shuffled by seeds
  derived from (seed, e), so every epoch is a fixed permutation of its own. A
  resumed run opens the epoch it stopped in and skips (reads, not decodes)
  only the records of that epoch it had consumed: resuming costs at most one
  epoch of the shard, however far the run got.
  """

  def __init__(self, builder, split: str, seed: int, shuffle_buffer: int,
               process_index: int = 0, process_count: int = 1):
    import tensorflow_datasets as tfds
    self.process_index = process_index
    self.builder, self.seed, self.shuffle_buffer = builder, seed, shuffle_buffer
    self.num_examples = builder.info.splits[split].num_examples
    folder = isinstance(builder, tfds.folder_dataset.ImageFolder)
    self.description = (f"image folder {builder.data_dir}, split {split!r}" if folder
                        else f"TFDS {builder.info.name} in {builder.data_dir}, split {split!r}")
    # ImageFolder knows no sub-splits: shard its records instead.
    self.shard = None
    if folder:
      self.split, self.shard = split, (process_count, process_index)
      self.epoch_size = len(range(process_index, self.num_examples, process_count))
    else:
      self.split = tfds.split_for_jax_process(split, process_index=process_index,
                                              process_count=process_count)
      self.epoch_size = builder.info.splits[self.split].num_examples

  def _epoch(self, epoch: int):
    """tf.data.Dataset of this process's shard in epoch `epoch`'s order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] >> 1)
    # tfds_id names the record in skip warnings (ImageFolder gives file names).
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, add_tfds_id=True)
    # ImageFolder's own file shuffle takes no seed; the seeded shuffle below orders it.
    ds = self.builder.as_dataset(split=self.split, shuffle_files=self.shard is None,
                                 read_config=read_config,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    if self.shard is not None:
      ds = ds.shard(*self.shard)
    ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def records(self, start: int):
    """(record number, key, raw image, label, name) of this process from record `start` on."""
    import tensorflow as tf
    epoch, offset = divmod(start, self.epoch_size)
    if offset:
      logging.info("Input resumes in epoch %d: reading past %d of the shard's %d records.",
                   epoch, offset, self.epoch_size)
    record = start
    while True:
      ds = self._epoch(epoch).skip(offset).prefetch(tf.data.AUTOTUNE)
      for example in ds.as_numpy_iterator():
        name = next((example[k] for k in ("image/filename", "file_name", "tfds_id")
                     if k in example), b"?")
        yield (record, (self.process_index, record), example["image"],
               int(example.get("label", -1)), _text(name))
        record += 1
      epoch, offset = epoch + 1, 0


def _text(name) -> str:
  return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of a prepared dataset, or DatasetMissing with instructions."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise DatasetMissing(IMAGENET_HELP.format(
        name=name, data_dir=data_dir or os.path.dirname(os.path.dirname(builder.data_dir)),
        manual_dir=os.path.join(data_dir or "~/tensorflow_datasets", "downloads", "manual")))
  return builder


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _describe_folder(path: str, limit: int = 6) -> str:
  """What a folder holds, for layout errors: 'cat/ (6 images), notes.txt, ...'."""
  entries = sorted(os.listdir(path))
  shown = []
  for name in entries[:limit]:
    full = os.path.join(path, name)
    if os.path.isdir(full):
      images = sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(full))
      shown.append(f"{name}/ ({images} images)")
    else:
      shown.append(name)
  more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
  return (", ".join(shown) + more) if entries else "nothing"


def check_image_folder(folder: str, split: str) -> None:
  """Raises DatasetMissing, saying what was expected and found, unless
  folder/<split>/<class>/<image> holds at least one image."""
  layout = (f"an image folder needs <folder>/{split}/<class name>/<image file> "
            f"(e.g. {split}/cat/001.jpg)")
  if not folder or not os.path.isdir(folder):
    raise DatasetMissing(f"config.data.folder = {folder!r} is not a directory: {layout}")
  split_dir = os.path.join(folder, split)
  if not os.path.isdir(split_dir):
    found = _describe_folder(folder)
    hint = ""
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for d in os.listdir(folder)
           if os.path.isdir(os.path.join(folder, d)) for f in os.listdir(os.path.join(folder, d))):
      hint = (f"\nIts subfolders hold images directly, so it looks like the {split!r} folder "
              f"itself: use --config.data.folder={os.path.dirname(os.path.abspath(folder))}")
    raise DatasetMissing(f"config.data.folder = {folder!r} has no {split!r} folder: {layout}."
                         f"\nFound: {found}{hint}")
  classes = [d for d in sorted(os.listdir(split_dir))
             if os.path.isdir(os.path.join(split_dir, d))]
  if not any(f.lower().endswith(IMAGE_EXTENSIONS) for c in classes
             for f in os.listdir(os.path.join(split_dir, c))):
    raise DatasetMissing(f"{split_dir} has no <class name>/<image file> inside: {layout}."
                         f"\nFound in {split_dir}: {_describe_folder(split_dir)}")


def image_folder_builder(folder: str, split: str = "train"):
  """TFDS ImageFolder over folder/<split>/<class>/<image>, its layout checked first."""
  import tensorflow_datasets as tfds
  check_image_folder(folder, split)
  return tfds.folder_dataset.ImageFolder(folder)


def make_source(data_config, image_size: int, seed: int, local_batch: int,
                process_index: int, process_count: int, split: str | None = None):
  """The source named by config.data.source."""
  split = split or data_config.split
  kind = data_config.source
  if kind == "digits":
    images, labels = digits(split, image_size)
    return ArraySource(images, labels, seed, local_batch, process_index, process_count)
  if kind == "synthetic":
    images, labels = synthetic(data_config.synthetic_size, image_size, seed)
    return ArraySource(images, labels, seed, local_batch, process_index, process_count)
  if kind == "tfds":
    builder = tfds_builder(data_config.name, data_config.data_dir)
  elif kind == "image_folder":
    builder = image_folder_builder(data_config.folder, split)
  else:
    raise ValueError(f"config.data.source = {kind!r}: allowed one of {SOURCES}")
  return TfdsSource(builder, split, seed, data_config.shuffle_buffer, process_index,
                    process_count)
