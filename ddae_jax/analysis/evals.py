"""An evaluator's metric over training (config.evals), across seeds: mean and spread.

Reads `<name>/<metric>` rows of each run's metrics.jsonl (the evaluators
inside pretraining write them with the step), as analysis/beta.py reads beta.
"""

from __future__ import annotations

import numpy as np

from ddae_jax.analysis.beta import read_metrics


def metric_curve(rows: list[dict], key: str) -> dict:
  """{"step": [...], "epoch": [...], "value": [...]} of `key`, sorted by step.

  A resumed run may log a step twice; the later row wins (as in beta_curves).
  The epoch of a step is step x (epochs per step), read off the training rows
  (each logs its step and epoch); None where the run logged no epoch.
  """
  values, per_step = {}, None
  for row in rows:
    step = int(row["step"])
    if key in row:
      values[step] = float(row[key])
    if "epoch" in row and step > 0:
      per_step = float(row["epoch"]) / step
  steps = sorted(values)
  return {"step": steps, "epoch": [None if per_step is None else s * per_step for s in steps],
          "value": [values[s] for s in steps]}


def group_summary(curves: list[dict]) -> dict:
  """Mean, standard deviation (ddof 0), min and max over runs, at the steps all share.

  Args:
    curves: `metric_curve` of each run of one group (seeds of one config).
  """
  steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
  if not steps:
    raise ValueError("the runs of a group share no evaluated step")
  table = np.asarray([[c["value"][c["step"].index(s)] for s in steps] for c in curves])
  first = curves[0]
  epochs = [first["epoch"][first["step"].index(s)] for s in steps]
  return {"step": steps, "epoch": epochs, "runs": table.tolist(),
          "mean": table.mean(0).tolist(), "std": table.std(0).tolist(),
          "min": table.min(0).tolist(), "max": table.max(0).tolist()}


def read_groups(workdirs: list[str], labels: list[str], key: str) -> dict[str, dict]:
  """{label: group_summary} with the runs of each label (repeat a label per seed)."""
  by_label: dict[str, list[dict]] = {}
  for label, workdir in zip(labels, workdirs, strict=True):
    curve = metric_curve(read_metrics(workdir), key)
    if not curve["step"]:
      raise SystemExit(f"{workdir}/metrics.jsonl has no {key!r} (is config.evals on?)")
    by_label.setdefault(label, []).append(curve)
  return {label: group_summary(curves) for label, curves in by_label.items()}
