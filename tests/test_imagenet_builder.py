"""The README's ImageNet commands on TFDS's real `imagenet2012` builder, offline.

A miniature manual download in the official tar layout (tests/mini_imagenet.py:
20 classes, 240 train and 20 validation JPEGs made from real photographs) is
prepared by TFDS itself; then the user's commands run as subprocesses on it:
ViT-B pretraining at 224 px (`configs/vitb.py:smoke`), its rerun (resume), and
the linear probe and k-NN binaries on the validation split.
"""

import json
import os
import sys
import time

import mini_imagenet
import pytest
import trainer_utils as tu
from helpers import load

DEVICES = 1  # ViT-B at 224 px is the cost here: more fake devices only split two cores
FIRST_STEPS, RESUMED_STEPS = 2, 3
TIMES = {}  # wall seconds per phase, printed at the end (the README's figures)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  t0 = time.perf_counter()
  made = mini_imagenet.prepare(data_dir)
  TIMES["prepare"] = time.perf_counter() - t0
  return dict(made, data_dir=data_dir)


def _step_overrides(steps: int, num_train: int) -> list[str]:
  """Overrides that stop the smoke run after `steps` steps.

  The smoke variant may count steps (config.num_steps) or epochs. No warm-up
  either way: an epoch of warm-up is longer than the run (a config error)
  and would keep the learning rate near zero for the few steps taken.
  """
  config = load("configs/vitb.py", "smoke")
  if "num_steps" in config:
    return [f"--config.num_steps={steps}", "--config.optim.warmup_epochs=0"]
  return [f"--config.epochs={steps * config.batch_size / num_train}",
          "--config.optim.warmup_epochs=0"]


def _timed(phase, cmd, timeout=1800):
  t0 = time.perf_counter()
  proc = tu.run(cmd, DEVICES, timeout=timeout)
  TIMES[phase] = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-4000:]
  return proc


def _eval_cmd(binary, config, workdir, init_dir, data_dir):
  return [sys.executable, "-m", f"ddae_jax.{binary}",
          f"--config={os.path.join(tu.REPO, config)}:smoke", f"--workdir={workdir}",
          f"--config.init_dir={init_dir}", f"--config.data.data_dir={data_dir}",
          "--config.data.workers=2"]


@pytest.mark.slow  # ViT-B at 224 px on the CPU: minutes; CI runs `-m slow`
def test_vitb_pretrains_resumes_and_evaluates_on_the_imagenet2012_builder(imagenet, tmp_path):
  builder = imagenet["builder"]
  assert builder.info.splits["train"].num_examples == imagenet["num_train"] == 240
  assert builder.info.splits["validation"].num_examples == imagenet["num_val"]
  assert "test" not in builder.info.splits  # no ILSVRC2012_img_test.tar: TFDS skips the split
  # Every validation image carries a class the train split holds.
  names = mini_imagenet.class_names()
  import tensorflow_datasets as tfds
  val = tfds.as_numpy(builder.as_dataset(split="validation"))
  got = {ex["file_name"].decode(): names[ex["label"]] for ex in val}
  assert got == {f"ILSVRC2012_val_{k:08d}.JPEG": s
                 for k, s in enumerate(imagenet["val_synsets"], 1)}
  assert set(got.values()) <= set(imagenet["synsets"])

  data_dir, workdir = imagenet["data_dir"], str(tmp_path / "pretrain")
  user = [f"--config.data.data_dir={data_dir}", "--config.data.workers=2"]
  first = tu.main_cmd(workdir, *user, *_step_overrides(FIRST_STEPS, imagenet["num_train"]),
                      config="configs/vitb.py:smoke")
  _timed("pretrain", first)
  steps = tu.checkpoint_steps(workdir)
  assert steps and steps[-1] == FIRST_STEPS, steps
  config = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert config["model"]["size"] == "base"
  # The dataset's size goes to the step arithmetic and the run's record, not the config.
  run = json.loads(open(os.path.join(workdir, "run.json")).read())
  assert run["num_train_images"] == 240, run

  # The rerun, asked for one more step, resumes from the checkpoint (the
  # TFDS stream skips what was read) rather than starting over.
  again = _timed("resume", tu.main_cmd(
      workdir, *user, *_step_overrides(RESUMED_STEPS, imagenet["num_train"]),
      config="configs/vitb.py:smoke"))
  assert f"Training steps {FIRST_STEPS}..{RESUMED_STEPS}" in again.stdout, again.stdout[-4000:]
  assert tu.checkpoint_steps(workdir)[-1] == RESUMED_STEPS
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r][-1] == RESUMED_STEPS

  lin = tmp_path / "lin"
  _timed("linear_probe", _eval_cmd("linear_probe", "configs/linear_probe_vitb.py", lin,
                                   workdir, data_dir))
  knn = tmp_path / "knn"
  _timed("knn", _eval_cmd("knn", "configs/knn_vitb.py", knn, workdir, data_dir))
  for out in (lin, knn):
    results = json.loads((out / "results.json").read_text())
    assert results["count"] == imagenet["num_val"], results  # every validation image, once
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0, results
  assert os.listdir(lin / "checkpoints")
  print("wall seconds:", {k: round(v, 1) for k, v in TIMES.items()})
