"""Global training batches as sharded jax.Arrays, decoded and cropped on the host.

Each process decodes and augments its local share of every global batch in a
thread pool, skips (and counts) images that cannot be decoded, and assembles
the global batch with `jax.make_array_from_process_local_data`. A background
thread keeps `prefetch` batches ready. Augmentation randomness is a function of
(seed, the record's key), so a resumed run makes the same crops.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading

import jax
import numpy as np

from ddae_jax.data import augment, sources


class TrainLoader:
  """Iterator of {"image": uint8[global_batch, S, S, 3]} sharded over the mesh.

  `view(image, rng) -> {name: array}` replaces the pretraining crop (the
  evaluation protocols' augmentations); `labels=True` adds "label": int32[B].
  After `max_failures` undecodable images in a row the source is taken to be
  unreadable (a wrong folder, a broken download): InputUnreadable, naming it.

  Attributes:
    position: records of this process's stream consumed by the batches handed
      out so far (checkpoint it; pass it back as `start` to resume).
    skipped: undecodable images skipped so far.
  """

  def __init__(self, source, sharding, local_batch: int, image_size: int, seed: int,
               start: int = 0, scale=(0.2, 1.0), flip: bool = True, workers: int = 8,
               prefetch: int = 2, view=None, labels: bool = False, color_jitter: float = 0.0,
               max_failures: int = 100):
    self.view, self.labels = view, labels
    self.source, self.max_failures, self._failures_in_a_row = source, max_failures, 0
    self.sharding, self.local_batch, self.size = sharding, local_batch, image_size
    self.seed, self.scale, self.flip = seed, tuple(scale), flip
    self.color_jitter = color_jitter  # BEiT's ColorJitter strength; 0 = none
    self.position, self.skipped = start, 0
    self._cursor = start  # the producer's position, ahead of `position` by the queue
    self._records = source.records(start)
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    self._queue: queue.Queue = queue.Queue(max(1, prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True)
    self._thread.start()

  def _view(self, record):
    number, key, image, label, name = record
    rng = np.random.default_rng([self.seed, *key])
    try:
      if self.view is None:
        out = {"image": augment.pretrain_view(image, rng, self.size, self.scale, self.flip,
                                              self.color_jitter)}
      else:
        out = self.view(image, rng)
      if self.labels:
        out["label"] = np.int32(label)
      return out
    except augment.UndecodableImage as err:
      logging.warning("Skipping undecodable image %s (record %d): %s", name, number, err)
      return None

  def _host_batch(self):
    """({name: [local_batch, ...]}, position after it, images skipped in it)."""
    images, skipped, end = [], 0, self._cursor
    while len(images) < self.local_batch:
      chunk = [next(self._records) for _ in range(self.local_batch - len(images))]
      for record, view in zip(chunk, self._pool.map(self._view, chunk), strict=True):
        end = record[0] + 1
        if view is None:
          skipped += 1
          self._failures_in_a_row += 1
        else:
          images.append(view)
          self._failures_in_a_row = 0
      if self._failures_in_a_row >= self.max_failures:
        raise sources.InputUnreadable(
            f"{self._failures_in_a_row} images in a row could not be decoded from "
            f"{getattr(self.source, 'description', self.source)} (the last: {chunk[-1][4]}); "
            "check that it holds images in a format PIL reads")
    self._cursor = end
    return {k: np.stack([v[k] for v in images]) for k in images[0]}, end, skipped

  def _fill(self):
    try:
      while not self._stop.is_set():
        item = self._host_batch()
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as err:  # surfaced to the consumer, not lost in the thread
      self._queue.put(err)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    arrays, self.position, skipped = item
    self.skipped += skipped
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in arrays.items()}

  def close(self):
    self._stop.set()
    self._pool.shutdown(wait=False, cancel_futures=True)
