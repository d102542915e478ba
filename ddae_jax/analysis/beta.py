"""Fig. 5/6: every beta over training, read from a run's metrics.jsonl (no TensorBoard)."""

from __future__ import annotations

import json
import re

from etils import epath

# Written by train_step: beta/<branch>/block_<g>, branch "shared", "pixel" or "distill".
BETA_KEY = re.compile(r"^beta/(?P<branch>[a-z]+)/block_(?P<block>\d+)$")


def read_metrics(workdir) -> list[dict]:
  """The scalar rows of `workdir/metrics.jsonl` (hparams rows left out)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a pretraining workdir?")
  return [row for row in map(json.loads, filter(None, path.read_text().splitlines()))
          if "step" in row]


def beta_curves(rows: list[dict]) -> dict[str, dict]:
  """{metric name: {"branch", "block", "step": [...], "epoch": [...], "value": [...]}}.

  A resumed run logs some steps twice (from the last checkpoint on); the
  later row wins, as it is the one the run continued from. Curves are sorted
  by step, and names by branch then block number.

  Args:
    rows: from `read_metrics`.
  """
  by_step: dict[str, dict[int, tuple]] = {}
  for row in rows:
    for key, value in row.items():
      if BETA_KEY.match(key):
        by_step.setdefault(key, {})[int(row["step"])] = (row.get("epoch"), float(value))
  curves = {}
  for key in sorted(by_step, key=lambda k: (BETA_KEY.match(k)["branch"],
                                            int(BETA_KEY.match(k)["block"]))):
    steps = sorted(by_step[key])
    m = BETA_KEY.match(key)
    curves[key] = {"branch": m["branch"], "block": int(m["block"]), "step": steps,
                   "epoch": [by_step[key][s][0] for s in steps],
                   "value": [by_step[key][s][1] for s in steps]}
  return curves


def curve_summary(curve: dict, x: str = "epoch") -> dict:
  """The shape of one beta curve, as Fig. 5 describes it.

  Returns:
    {"first", "min", "min_at", "final"} (values, and `x` where the minimum is)
    and "drop_then_rise": the curve falls below its first value and ends
    above its minimum by more than a tenth of that drop.
  """
  values, xs = curve["value"], curve[x]
  low = min(range(len(values)), key=values.__getitem__)
  drop = values[0] - values[low]
  return {"first": values[0], "min": values[low], "min_at": xs[low], "final": values[-1],
          "drop_then_rise": bool(drop > 0 and values[-1] - values[low] > 0.1 * drop)}
