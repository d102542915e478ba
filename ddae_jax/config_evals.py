"""The evaluators a pretraining run runs while it trains (config.evals): fields and checks.

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

from ddae_jax.config_lib import fail, one_of
from ddae_jax.models.vit import VIT_SIZES

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


def check(config, num_devices: int | None = None) -> None:
  """Checks every evaluator of config.evals; raises ConfigError naming `evals.<name>.<field>`."""
  from ddae_jax import config_checks  # imports config_lib, which imports this module lazily
  reference = knn(1.0, 1, "test", 0, 1)
  depth = VIT_SIZES[config.model.size][1]
  for name, ev in config.get("evals", {}).items():
    f = f"evals.{name}"
    if not isinstance(ev, (ml_collections.ConfigDict, dict)):
      fail(f, ev, "an evaluator section (config_evals.knn(...))")
    missing = sorted(set(reference) - set(ev))
    if missing:
      fail(f, dict(ev), f"an evaluator with the fields {sorted(reference)} (missing {missing})")
    config_checks.check_types(ml_collections.ConfigDict({name: ev}),
                              ml_collections.ConfigDict({name: reference}), prefix="evals.")
    one_of(config, f"{f}.kind", KINDS)
    one_of(config, f"{f}.encoder", ENCODERS)
    one_of(config, f"{f}.pooling", POOLINGS)
    if ev.encoder == "ema" and (config.method != "ddae" or not config.distill.enabled):
      fail(f"{f}.encoder", ev.encoder, "'online': this run has no momentum encoder "
           "(only DDAE with distill.enabled = True keeps one)")
    for field in ("every_epochs", "every_steps", "bank_size", "num_queries", "num_classes"):
      if ev[field] < 0:
        fail(f"{f}.{field}", ev[field], "a value >= 0 (0: see config_evals.py)")
    if not 0 <= ev.block <= depth:
      fail(f"{f}.block", ev.block, f"0 (the method's lineage) or a block in [1, {depth}]")
    for field in ("k", "batch_size"):
      if ev[field] < 1:
        fail(f"{f}.{field}", ev[field], "an integer >= 1")
    if 0 < ev.bank_size < ev.k:
      fail(f"{f}.bank_size", ev.bank_size, f"0 (the whole split) or at least k = {ev.k}")
    if ev.temperature <= 0:
      fail(f"{f}.temperature", ev.temperature, "a value > 0")
    if not 0 < ev.crop_ratio <= 1:
      fail(f"{f}.crop_ratio", ev.crop_ratio, "a value in (0, 1]")
    for field in ("bank_split", "query_split"):
      if not ev[field]:
        fail(f"{f}.{field}", ev[field], "a split of config.data (e.g. 'train', 'validation')")
    if num_devices is not None and ev.batch_size % num_devices:
      fail(f"{f}.batch_size", ev.batch_size, f"a multiple of the {num_devices} devices")
