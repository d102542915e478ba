"""Evaluators inside pretraining (config.evals): k-NN of the encoder being trained.

A pretraining run's loss says little about its features; solo-learn's online
k-NN and big_vision's evaluators report them while the run trains. Here each
entry of config.evals (config_evals.py) runs between two steps of
runtime.train_loop (its `after_step`):

- on the training mesh: features are computed by a jitted forward of the
  chosen encoder read straight from the live train state (no second copy of
  the parameters), batches split over the devices as training's are;
- multi-host exact: each process reads its contiguous share of the bank and
  of the queries (evaluation/input_pipeline.py, padded rows masked), the bank
  stays split over the devices, and the jitted scorer sums over the global
  batch, so every query counts once whatever the number of hosts;
- preemption-safe: between batches it polls the run's StopDecision (the same
  poll count on every process, which all run the same batches); on a stop it
  abandons the pass, and the loop saves and exits;
- on schedule: step s evaluates when s is a multiple of the interval and at
  the run's last step. A resumed run first evaluates its starting step when
  that step was due and metrics.jsonl has no result for it (the evaluation a
  preemption interrupted).

Results go to the run's writer (CLU / TensorBoard where present, and
metrics.jsonl) as `<name>/top1`, `top5`, `loss`, `count` and `seconds`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from ddae_jax import config_evals, runtime, sharding
from ddae_jax.evaluation import input_pipeline, knn, readout, scoring
from ddae_jax.models import attention
from ddae_jax.weights import pretrained

# Decoded evaluation images a process keeps between evaluations, per set.
HOST_CACHE_BYTES = 2 << 30


def balanced_batch(rows: int, num_batches: int, multiple: int) -> int:
  """The smallest batch, a multiple of `multiple`, whose `num_batches` hold `rows`."""
  return math.ceil(math.ceil(rows / num_batches) / multiple) * multiple


class KnnEvaluator:
  """DINO's weighted k-NN of one encoder's features, on the training mesh.

  Attributes:
    name: the evaluator's key in config.evals (its metrics' prefix).
    every: steps between evaluations (0: never).
    block, pooling: what it reads (evaluation/readout.py).
    embed: jitted (state, batch) -> unit-norm features (perf/aot_evals.py compiles it).
  """

  def __init__(self, name: str, ev, config, method, mesh, num_images: int):
    """Args: ev: config.evals[name]; method: the run's methods.base.Method (its
    encoder module); num_images: the run's train set size (epochs count it)."""
    self.name, self.ev, self.config, self.mesh = name, ev, config, mesh
    self.every = config_evals.interval_steps(ev, num_images, config.batch_size)
    depth = method.encoder.depth
    self.block, self.pooling = readout.resolve(ev.block, ev.pooling, depth, config)
    # The encoder as if it ended at `block` (BootMAE's linear probe --depth):
    # later blocks are not run; "cls" reads the final norm of `block`'s output.
    encoder = method.encoder.clone(depth=self.block, feature_blocks=(self.block,),
                                   feature_norm="final", drop_path=0.0, remat=False)
    self.batch_spec = sharding.batch_sharding(mesh)

    def embed(state, batch):
      params = pretrained.encoder_from_state(state, ev.encoder)
      with attention.kernel_mesh(mesh, sharding.BATCH_AXES):  # as the train step traces
        return knn.embed(encoder, self.pooling, params, batch)

    self.embed = jax.jit(embed, out_shardings=self.batch_spec)
    self._concat = jax.jit(lambda parts: jax.tree.map(lambda *x: jnp.concatenate(x), *parts),
                           out_shardings=self.batch_spec)
    self._score = None  # jitted on the first pass, once the number of classes is known
    self._cache = {}  # (split, limit) -> (images, this process's host batches)
    logging.info("Evaluator %s: k-NN of the %s encoder's %s every %d steps", name, ev.encoder,
                 readout.describe(self.block, self.pooling, depth), self.every)

  def due(self, step: int, last: bool) -> bool:
    return self.every > 0 and step > 0 and (step % self.every == 0 or last)

  def _batches(self, split: str, limit: int):
    """(images in the set, its sharded batches): the first `limit` images of `split`.

    This process's rows are decoded once and kept when they fit in
    HOST_CACHE_BYTES (the quickstart's 1,797 digits: 5.5 MB at most; a pod host's
    share of the ImageNet default), else read again at every evaluation.
    """
    key = (split, limit)
    if key not in self._cache:
      ev, pc = self.ev, jax.process_count()
      total, examples = input_pipeline.eval_examples(
          self.config.data, split, self.config.model.image_size, jax.process_index(), pc, limit)
      size = self.config.model.image_size
      rows = math.ceil(total / pc)
      # As few batches as batch_size allows, each as small as covers the set:
      # 300 queries in batches of 256 run as 2 x 150, not 2 x 256 (40% padding).
      num_batches = input_pipeline.num_eval_batches(total, ev.batch_size, pc)
      local = balanced_batch(rows, num_batches, jax.local_device_count())
      host = input_pipeline.eval_host_batches(
          examples, num_batches, local, size, ev.crop_ratio, self.config.data.workers)
      if rows * size * size * 3 <= HOST_CACHE_BYTES:
        host = list(host)
        self._cache[key] = (total, host)
      else:
        return total, (input_pipeline.to_global(b, self.batch_spec) for b in host)
    total, host = self._cache[key]
    return total, (input_pipeline.to_global(b, self.batch_spec) for b in host)

  def __call__(self, state, stop) -> dict | None:
    """Scores of the encoder in `state`; None when `stop()` said stop during the pass."""
    ev = self.ev
    n_bank, batches = self._batches(ev.bank_split, ev.bank_size)
    if n_bank < ev.k:
      raise ValueError(f"config.evals.{self.name}.k = {ev.k} exceeds the {n_bank} images of "
                       f"its bank ({ev.bank_split!r})")
    parts = []
    for batch in batches:
      if stop():
        return None
      parts.append(self.embed(state, batch))
    bank = self._concat(parts)
    if self._score is None:
      classes = ev.num_classes or int(jax.device_get(bank["label"].max())) + 1
      self._score = jax.jit(functools.partial(knn.knn_sums, ev.k, ev.temperature, classes),
                            out_shardings=sharding.replicated(self.mesh))
    _, queries = self._batches(ev.query_split, ev.num_queries)
    return scoring.accumulate(lambda b: self._score(bank, self.embed(state, b)), queries,
                              stop=stop)


KINDS = {"knn": KnnEvaluator}


class Evaluators:
  """Every evaluator of config.evals, run by the train loop between steps."""

  def __init__(self, config, method, mesh, writer, workdir):
    """method: the run's methods.base.Method; its derived.steps count the epochs."""
    steps = method.derived.steps
    self.writer, self.workdir, self.total_steps = writer, epath.Path(workdir), steps.total
    self.all = [KINDS[ev.kind](name, ev, config, method, mesh, steps.num_images)
                for name, ev in config.get("evals", {}).items()]
    self.all = [e for e in self.all if e.every > 0]

  def run(self, evaluator, state, step: int) -> bool:
    """Runs one evaluation at `step` and logs it; False when a stop abandoned it."""
    logging.info("Evaluating %s at step %d", evaluator.name, step)
    jax.block_until_ready(state)  # the steps still in flight are training's time, not this
    start = time.perf_counter()
    results = evaluator(state, runtime.stop_decision().poll)
    if results is None:
      logging.warning("%s at step %d abandoned for the preemption; the resumed run redoes it",
                      evaluator.name, step)
      return False
    results["seconds"] = time.perf_counter() - start
    scoring.log_eval(self.writer, step, results, prefix=evaluator.name)
    return True

  def after_step(self, state, step: int, done: bool) -> None:
    """runtime.train_loop's after_step: the evaluations due at `step`."""
    for evaluator in self.all:
      if evaluator.due(step, done) and not self.run(evaluator, state, step):
        return

  def resume(self, state, step: int) -> None:
    """Before a resumed run's first step: the evaluations of `step` that have no result."""
    due = [e for e in self.all if e.due(step, step == self.total_steps)]
    if not due:
      return
    missing = np.asarray([not self._logged(e.name, step) for e in due], np.int32)
    if jax.process_count() > 1:  # process 0 wrote metrics.jsonl; all must agree
      missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    for evaluator, todo in zip(due, missing, strict=True):
      if todo and not self.run(evaluator, state, step):
        return

  def _logged(self, name: str, step: int) -> bool:
    path = self.workdir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
      return False
    key = f"{name}/top1"
    for line in path.read_text().splitlines():
      if key in line:
        row = json.loads(line)
        if row.get("step") == step and key in row:
          return True
    return False
