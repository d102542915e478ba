"""Metric writers: CLU (TensorBoard + log) where tensorflow exists, plus a JSONL file.

Only process 0 writes. `metrics.jsonl` in the workdir is always written (one
JSON object per logged step), so runs on machines without tensorflow keep
their metrics, and analysis tools can read beta curves without TensorBoard.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np


class JsonlWriter:
  """Adds {"step": s, name: value, ...} lines to <workdir>/metrics.jsonl.

  Local files are appended to. Object stores (gs://) cannot append, so there
  the rows are kept and the whole file is rewritten at each flush (a few
  thousand short lines for a long run); a resumed run starts from the rows
  already written.
  """

  def __init__(self, workdir: str, append: bool | None = None):
    from etils import epath
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.append = "://" not in str(workdir) if append is None else append
    self._rows: list[str] = []
    if self.append:
      self._file = self.path.open("a")
    elif self.path.exists():
      self._rows = self.path.read_text().splitlines()

  def _add(self, row: dict):
    line = json.dumps(row)
    if self.append:
      self._file.write(line + "\n")
    else:
      self._rows.append(line)

  def write_scalars(self, step: int, scalars: dict):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._add(row)

  def write_hparams(self, hparams: dict):
    self._add({"hparams": {k: str(v) for k, v in hparams.items()}})

  def flush(self):
    if self.append:
      self._file.flush()
    else:
      self.path.write_text("".join(line + "\n" for line in self._rows))

  def close(self):
    self.flush()
    if self.append:
      self._file.close()


class LogWriter:
  """Logs scalars with absl/logging; the no-tensorflow stand-in for CLU's log writer."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(np.asarray(v)):.6g}"
                                             for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams):
    logging.info("hparams: %s", hparams)

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def tensorflow_available() -> bool:
  """Whether CLU's TensorBoard writers can be used (DDAE_NO_TENSORBOARD=1 opts out)."""
  if os.environ.get("DDAE_NO_TENSORBOARD"):
    return False
  try:
    import clu.metric_writers  # noqa: F401
    import tensorflow  # noqa: F401
    return True
  except ImportError:
    return False


def create_writer(workdir: str, use_tensorboard: bool | None = None):
  """Writers for this process: TensorBoard + log + JSONL on process 0, nothing elsewhere."""
  if jax.process_index() != 0:
    return MultiWriter([])
  if use_tensorboard is None:
    use_tensorboard = tensorflow_available()
  writers = [JsonlWriter(workdir)]
  if use_tensorboard:
    from clu import metric_writers
    writers.append(metric_writers.create_default_writer(workdir, asynchronous=False))
  else:
    writers.append(LogWriter())
  return MultiWriter(writers)
