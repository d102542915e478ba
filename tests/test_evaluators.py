"""Evaluators inside pretraining (config.evals): readouts, config errors, schedule, resume,
the k-NN binary's numbers on the training mesh, multi-host exactness and preemption."""

import json
import os
import signal
import time

import ml_collections
import numpy as np
import pytest
import trainer_utils
from helpers import load

from ddae_jax import config_checks, config_evals, config_lib, train_step
from ddae_jax.evaluation import config as eval_config
from ddae_jax.evaluation import evaluators, knn, readout
from ddae_jax.weights import pretrained

IMAGE = 16  # the quickstart's tiny ViT on 16 px digits: 16 patches, a fast forward


def _pretrain(lineage, size="base"):
  config = load("configs/quickstart.py", {"mae": "mae", "bootmae": ""}.get(lineage, ""))
  if lineage == "beitv2":
    config.method = "beitv2"
  config.model.size = size
  return config


@pytest.mark.parametrize("lineage, size, want", [
    ("bootmae", "base", (10, "avg")), ("bootmae", "large", (18, "avg")),
    ("bootmae", "small", (10, "avg")), ("bootmae", "tiny", (4, "avg")),
    ("mae", "base", (12, "cls")), ("mae", "large", (24, "cls")),
    ("beitv2", "base", (12, "cls"))])
def test_readout_follows_the_lineage(lineage, size, want):
  config = _pretrain(lineage, size)
  depth = config_lib.encoder_dims(config)[1]
  assert readout.lineage(config) == lineage
  assert readout.resolve(0, "auto", depth, config) == want
  # What is given is kept; a random encoder (no pretraining config) reads as DDAE does.
  assert readout.resolve(3, "cls", depth, config) == (3, "cls")
  assert readout.resolve(0, "auto", 12, None) == (10, "avg")
  with pytest.raises(ValueError, match=f"outside the encoder's blocks \\[1, {depth}\\]"):
    readout.resolve(depth + 1, "avg", depth, config)


@pytest.mark.parametrize("field, value, allowed", [
    ("kind", "svm", "one of ('knn',)"), ("encoder", "target", "one of ('online', 'ema')"),
    ("pooling", "max", "one of ('auto', 'avg', 'cls')"), ("block", 5, "a block in [1, 4]"),
    ("every_epochs", -1.0, "a value >= 0"), ("k", 0, "an integer >= 1"),
    ("bank_size", 5, "at least k = 20"), ("temperature", 0.0, "a value > 0"),
    ("crop_ratio", 1.5, "a value in (0, 1]"), ("query_split", "", "a split of config.data"),
    ("batch_size", 100, "a multiple of the 8 devices")])
def test_evaluator_config_errors_name_the_field(field, value, allowed):
  config = load("configs/quickstart.py")
  with config.unlocked():
    config.evals.knn[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"evals.knn.{field}") as e:
    config_checks.validate(config, num_devices=8)
  assert allowed in str(e.value)


def test_momentum_encoder_needs_a_run_that_keeps_one():
  config = load("configs/quickstart.py", "mae")
  config.evals.knn.encoder = "ema"
  with pytest.raises(config_lib.ConfigError, match="evals.knn.encoder = 'ema'.*no momentum"):
    config_checks.validate(config)
  config = load("configs/quickstart.py")
  config.evals.knn.encoder = "ema"
  config_checks.validate(config)


def test_an_incomplete_or_mistyped_evaluator_is_named():
  config = load("configs/quickstart.py")
  config.evals.probe = ml_collections.ConfigDict({"kind": "knn", "every_steps": 10})
  with pytest.raises(config_lib.ConfigError, match=r"evals.probe = .*missing \['bank_size'"):
    config_checks.validate(config)
  config = load("configs/quickstart.py")
  fields = dict(config_evals.knn(1.0, 0, "test", 0, 64).to_dict(), k="20")
  config.evals.probe = ml_collections.ConfigDict(fields)
  with pytest.raises(config_lib.ConfigError, match="evals.probe.k"):
    config_checks.validate(config)


def test_schedule_in_epochs_or_steps_and_at_the_end():
  ev = config_evals.knn(2.0, 0, "test", 0, 64)
  assert config_evals.interval_steps(ev, 1497, 64) == 47  # 2 x 1497 / 64 = 46.8
  ev.every_steps = 10
  assert config_evals.interval_steps(ev, 1497, 64) == 10
  ev.every_steps, ev.every_epochs = 0, 0.0
  assert config_evals.interval_steps(ev, 1497, 64) == 0
  # Every preset: ImageNet every 10 epochs; tiny (the tests' runs) off; smoke at its end.
  assert load("configs/vitb.py").evals.knn.every_epochs == 10.0
  assert load("configs/tiny.py").evals.knn.every_epochs == 0.0
  smoke = load("configs/vitb.py", "smoke")
  assert smoke.evals.knn.every_steps == smoke.num_steps
  evaluator = evaluators.KnnEvaluator.__new__(evaluators.KnnEvaluator)
  evaluator.every = 47
  assert [s for s in range(235) if evaluator.due(s, s == 234)] == [47, 94, 141, 188, 234]


class _Recorder:
  """An evaluator that records the steps it ran at and answers from a script."""

  def __init__(self, name, every, answers=()):
    self.name, self.every, self.ran, self.answers = name, every, [], list(answers)

  due = evaluators.KnnEvaluator.due

  def __call__(self, state, stop):
    self.ran.append(state)
    return self.answers.pop(0) if self.answers else {"top1": 0.5, "top5": 1.0, "loss": 0.7,
                                                     "count": 3.0}


def _evaluators(workdir, *members, total_steps=100):
  group = evaluators.Evaluators.__new__(evaluators.Evaluators)
  group.writer = _Writer(workdir)
  group.workdir, group.total_steps, group.all = workdir, total_steps, list(members)
  return group


class _Writer:
  """metrics.jsonl's rows as the run's writer appends them."""

  def __init__(self, workdir):
    self.path = workdir / "metrics.jsonl"

  def write_scalars(self, step, values):
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

  def flush(self):
    pass


def test_resume_redoes_only_a_due_evaluation_without_a_result(tmp_path):
  knn_ev, other = _Recorder("knn", 10), _Recorder("other", 7)
  group = _evaluators(tmp_path, knn_ev, other)
  group.after_step("state20", 20, False)
  assert knn_ev.ran == ["state20"] and other.ran == []
  group.resume("state20", 20)  # logged already: nothing again
  assert knn_ev.ran == ["state20"]
  group.resume("state30", 30)  # due and missing (the preemption cut it off)
  group.resume("state31", 31)  # not due
  group.resume("state100", 100)  # the last step is always due
  assert knn_ev.ran == ["state20", "state30", "state100"] and other.ran == ["state100"]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], sorted(r)) for r in rows][1] == (
      30, ["knn/count", "knn/loss", "knn/seconds", "knn/top1", "knn/top5", "step"])


def test_an_abandoned_evaluation_logs_nothing_and_stops_the_others(tmp_path):
  first, second = _Recorder("knn", 5, answers=[None]), _Recorder("knn2", 5)
  group = _evaluators(tmp_path, first, second)
  group.after_step("s", 5, False)
  assert first.ran == ["s"] and second.ran == [] and not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def run_and_checkpoint(tmp_path_factory):
  """The quickstart's method at 16 px, its state after init, an evaluator on it,
  and the online encoder saved as a pretraining workdir for the knn binary."""
  config = load("configs/quickstart.py")
  config.model.image_size = IMAGE
  config.evals.knn.update(batch_size=128, every_steps=1, bank_size=0)  # the binary's bank
  built = train_step.build(config)
  ev = evaluators.KnnEvaluator("knn", config.evals.knn, config, built.model, built.mesh, 1497)
  workdir = tmp_path_factory.mktemp("pretrain")
  pretrained.save_encoder(workdir, pretrained.encoder_from_state(built.state, "online"), config)
  return config, built, ev, workdir


def test_in_loop_knn_equals_the_knn_binary(run_and_checkpoint):
  config, built, ev, workdir = run_and_checkpoint
  assert (ev.block, ev.pooling) == (4, "avg")
  got = ev(built.state, lambda: False)
  c = eval_config.quickstart(eval_config.BUILDERS["knn"]("tiny"))
  c.model.image_size, c.init_dir, c.batch_size, c.eval_batch_size = IMAGE, str(workdir), 64, 64
  want = knn.evaluate(c)
  assert got["count"] == want["count"] == 300  # every held-out digit once
  assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  # The padded batches: 1,497 bank images as 12 x 128 (not more), 300 queries as 3 x 104.
  _, bank = ev._batches("train", 0)
  _, queries = ev._batches("test", 0)
  assert [b["image"].shape[0] for b in bank] == [128] * 12
  assert [b["image"].shape[0] for b in queries] == [104] * 3


def test_a_stop_during_the_evaluation_abandons_it(run_and_checkpoint):
  config, built, ev, _ = run_and_checkpoint
  polls = []
  stop = lambda: polls.append(1) or len(polls) > 3
  assert ev(built.state, stop) is None and len(polls) == 4  # stopped at the 4th batch


# ------------------------------------------------------------------ slow: real runs
def _knn_rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "knn/top1" in r}


QUICK = ("--config.num_steps=4", f"--config.model.image_size={IMAGE}", "--config.batch_size=32",
         "--config.evals.knn.every_steps=2", "--config.evals.knn.batch_size=64",
         "--config.log_every_steps=1", "--config.checkpoint_every_steps=100",
         "--config.optim.warmup_epochs=0")


@pytest.mark.slow
def test_one_process_and_two_processes_count_every_query_once(tmp_path):
  one = tmp_path / "one"
  run = trainer_utils.run(trainer_utils.main_cmd(one, *QUICK, config="configs/quickstart.py"),
                          devices=2, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:]
  two = tmp_path / "two"
  procs = trainer_utils.start_processes(two, *QUICK, "--config.data.workers=1",
                                        devices=1, config="configs/quickstart.py")
  for p in procs:
    assert p.wait(timeout=600) == 0, p.output()[-3000:]
  a, b = _knn_rows(one), _knn_rows(two)
  assert sorted(a) == sorted(b) == [2, 4]
  for step in a:
    assert a[step]["knn/count"] == b[step]["knn/count"] == 300
    # The same state on 2 devices either way: the same neighbours and votes.
    for key in ("knn/top1", "knn/top5"):
      assert a[step][key] == b[step][key], (step, key)
    np.testing.assert_allclose(a[step]["knn/loss"], b[step]["knn/loss"], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_during_an_evaluation_saves_exits_and_the_rerun_redoes_it(tmp_path):
  workdir = tmp_path / "run"
  # Batches of 8: the evaluation runs ~225 batches, long enough to be caught inside.
  args = (*QUICK[1:], "--config.num_steps=6", "--config.evals.knn.every_steps=3",
          "--config.evals.knn.batch_size=8", "--config.evals.knn.bank_size=0")
  proc = trainer_utils.start(trainer_utils.main_cmd(workdir, *args,
                                                    config="configs/quickstart.py"), devices=1)
  deadline = time.monotonic() + 400
  while "Evaluating knn at step 3" not in proc.output():
    assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
    time.sleep(0.05)
  signaled = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.output()[-3000:]
  log = proc.output()
  assert "knn at step 3 abandoned for the preemption" in log, log[-3000:]
  assert time.monotonic() - signaled < 60
  assert trainer_utils.checkpoint_steps(workdir)[-1] == 3
  assert 3 not in _knn_rows(workdir)
  rerun = trainer_utils.run(trainer_utils.main_cmd(workdir, *args,
                                                   config="configs/quickstart.py"), devices=1)
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  rows = _knn_rows(workdir)
  assert sorted(rows) == [3, 6] and rows[3]["knn/count"] == 300
  assert "checkpoints, step 3" in rerun.stdout, rerun.stdout[-3000:]


def test_quickstart_default_evaluates_on_the_held_out_digits():
  config = load("configs/quickstart.py")
  ev = config.evals.knn
  assert (ev.kind, ev.query_split, ev.num_queries, ev.bank_split, ev.bank_size) == (
      "knn", "test", 0, "train", 0)
  # Epochs 3.3, 6.7 and 10 of the 234-step run.
  assert config_evals.interval_steps(ev, 1497, config.batch_size) == 78
