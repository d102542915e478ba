"""Labelled input for the protocols: augmented training views and padded evaluation batches.

Evaluation reads every example of a split exactly once over all processes:
process p of P takes a contiguous 1/P of the split (TFDS's
`split_for_jax_process(drop_remainder=False)`, or the same slicing of
in-memory arrays), every process runs the same number of global batches
(ceil(ceil(n / P) / local batch)), and the last ones are padded with
`mask = False` rows, so sums over the mask count each example once.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Iterator

import jax
import numpy as np
from PIL import Image

from ddae_jax.data import augment, sources
from ddae_jax.evaluation import mixup
from ddae_jax.evaluation.randaugment import rand_augment


def finetune_view(config):
  """timm's training transform of MAE fine-tuning, as a TrainLoader `view`.

  Random-resized crop (bicubic), flip, RandAugment, and the random-erasing
  box (applied on the device, after normalisation, as timm does).
  """
  size, a = config.model.image_size, config.aug

  def view(image, rng):
    img = augment.decode(image)
    box = augment.random_resized_crop_box(rng, img.width, img.height, config.data.crop_scale)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if config.data.flip and rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if a.randaug_ops > 0:
      img = rand_augment(img, rng, a.randaug_ops, a.randaug_magnitude, a.randaug_magnitude_std)
    return {"image": np.asarray(img, np.uint8),
            "erase": mixup.erase_box(rng, size, size, a.reprob)}
  return view


def probe_view(config):
  """MAE's linear-probe training transform: random-resized crop (bicubic) and flip."""
  def view(image, rng):
    return {"image": augment.pretrain_view(image, rng, config.model.image_size,
                                           config.data.crop_scale, config.data.flip)}
  return view


def split_for_process(n: int, process_index: int, process_count: int) -> range:
  """The contiguous share [start, stop) of n examples that this process evaluates."""
  bounds = np.linspace(0, n, process_count + 1).round().astype(int)
  return range(int(bounds[process_index]), int(bounds[process_index + 1]))


def num_eval_batches(n: int, global_batch: int, process_count: int) -> int:
  """Global batches that cover the largest process share (same on every process)."""
  per_process = math.ceil(n / process_count)
  return max(1, math.ceil(per_process / (global_batch // process_count)))


def eval_examples(data_config, split: str, image_size: int, process_index: int = 0,
                  process_count: int = 1, limit: int = 0) -> tuple[int, Iterator]:
  """(examples in the whole split, iterator over this process's (image, label)).

  limit > 0: only the split's first `limit` examples (in its stored order), as
  if the split held no more (an evaluator's bounded memory bank or query set).
  """
  kind = data_config.source
  if kind in ("digits", "synthetic"):
    if kind == "digits":
      images, labels = sources.digits(split, image_size)
    else:
      images, labels = sources.synthetic(data_config.synthetic_size, image_size,
                                         seed=0 if split.startswith("train") else 1)
    n = min(len(images), limit) if limit > 0 else len(images)
    share = split_for_process(n, process_index, process_count)
    return n, ((images[i], int(labels[i])) for i in share)
  import tensorflow_datasets as tfds
  if kind == "tfds":
    builder = sources.tfds_builder(data_config.name, data_config.data_dir)
    total = builder.info.splits[split].num_examples
    if limit > 0 and limit < total:
      split, total = f"{split}[:{limit}]", limit
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count, drop_remainder=False)
    ds = builder.as_dataset(split=sub, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  else:
    builder = sources.image_folder_builder(data_config.folder, split)
    total = builder.info.splits[split].num_examples
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    if limit > 0 and limit < total:
      ds, total = ds.take(limit), limit
    ds = ds.shard(process_count, process_index)  # ImageFolder has no sub-splits
  return total, ((ex["image"], int(ex["label"])) for ex in ds.as_numpy_iterator())


def eval_host_batches(examples: Iterator, num_batches: int, local_batch: int,
                      image_size: int, crop_ratio: float = 0.875, workers: int = 8):
  """Yields this process's rows of each batch: {"image": uint8[L, S, S, 3], "label", "mask"}.

  Its next `local_batch` examples, centre-cropped (resize to S / crop_ratio,
  bicubic), then zero padding with mask False once its share is exhausted.
  """
  resize = int(round(image_size / crop_ratio))
  view = lambda ex: augment.center_view(ex[0], image_size, resize)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for _ in range(num_batches):
      chunk = [ex for _, ex in zip(range(local_batch), examples, strict=False)]
      images = np.zeros((local_batch, image_size, image_size, 3), np.uint8)
      labels = np.zeros((local_batch,), np.int32)
      mask = np.zeros((local_batch,), bool)
      for i, (ex, img) in enumerate(zip(chunk, pool.map(view, chunk), strict=True)):
        images[i], labels[i], mask[i] = img, ex[1], True
      yield {"image": images, "label": labels, "mask": mask}


def to_global(host_batch: dict, sharding) -> dict:
  """One batch of every process's rows as global arrays laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def eval_batches(examples: Iterator, num_batches: int, local_batch: int, sharding,
                 image_size: int, crop_ratio: float = 0.875, workers: int = 8):
  """Yields {"image": uint8[G, S, S, 3], "label": int32[G], "mask": bool[G]} sharded
  (eval_host_batches of every process, G = processes x local_batch)."""
  for batch in eval_host_batches(examples, num_batches, local_batch, image_size, crop_ratio,
                                 workers):
    yield to_global(batch, sharding)


def eval_loader(config, split: str, sharding, batch_size: int | None = None):
  """(examples in the split, batches covering them once) for config.data / config.model."""
  batch = batch_size or config.eval_batch_size
  pc, pi = jax.process_count(), jax.process_index()
  total, examples = eval_examples(config.data, split, config.model.image_size, pi, pc)
  return total, eval_batches(examples, num_eval_batches(total, batch, pc), batch // pc,
                             sharding, config.model.image_size, config.data.crop_ratio,
                             config.data.workers)
