"""The evaluators a pretraining run runs while it trains (config.evals): their fields.

`config.evals` maps a name to an evaluator, as big_vision's `config.evals`
does; the name prefixes its metrics (`knn/top1` ...). Each evaluator:

  kind           "knn": DINO's weighted k-NN (the knn binary's protocol)
  every_epochs   how often, in epochs of the run's dataset (0: see every_steps)
  every_steps    how often, in steps (> 0 overrides every_epochs); both 0: off.
                 A scheduled evaluation also runs at the run's last step.
  encoder        "online" (theta) or "ema" (theta', runs with distillation only)
  block, pooling what it reads (evaluation/readout.py): 0 / "auto" follow the
                 method's lineage (DDAE: mean-pooled block 10 of ViT-B; MAE rows
                 and BEiT-v2: the last block's class token)
  bank_split, bank_size      the memory bank: the first bank_size images of
                 that split of config.data (0: the whole split)
  query_split, num_queries   the queries: the first num_queries images (0: all)
  k, temperature the k nearest and the votes' temperature (DINO: 20, 0.07)
  num_classes    0: the largest label of the bank + 1
  batch_size, crop_ratio     feature-extraction batch (global); centre crop of
                 image_size / crop_ratio resizes, as the evaluation binaries
"""

from __future__ import annotations

import ml_collections

KINDS = ("knn",)
# What a frozen-encoder readout pools (evaluation/readout.py): "auto" follows the lineage.
POOLINGS = ("auto", "avg", "cls")
ENCODERS = ("online", "ema")


def knn(every_epochs: float, bank_size: int, query_split: str, num_queries: int,
        batch_size: int) -> ml_collections.ConfigDict:
  """A k-NN evaluator reading the lineage's features of the online encoder."""
  return ml_collections.ConfigDict(dict(
      kind="knn", every_epochs=float(every_epochs), every_steps=0, encoder="online", block=0,
      pooling="auto", bank_split="train", bank_size=bank_size, query_split=query_split,
      num_queries=num_queries, k=20, temperature=0.07, num_classes=0, batch_size=batch_size,
      crop_ratio=0.875))


def interval_steps(ev, num_images: int, batch_size: int) -> int:
  """Steps between two evaluations of `ev` (0: never), at least 1 when on."""
  if ev.every_steps > 0:
    return int(ev.every_steps)
  if ev.every_epochs <= 0:
    return 0
  return max(1, int(round(ev.every_epochs * num_images / batch_size)))
