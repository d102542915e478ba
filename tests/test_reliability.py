"""A run never loses its way: resume checks, damaged checkpoints, override types, smoke runs,
preemption, bad input (issue 15). What checkpoints.py and runtime.py do on their own
(damaged steps, the steps in flight) is tested in tests/test_checkpoints.py and
tests/test_runtime.py."""

import json
import os

import jax
import numpy as np
import pytest
import trainer_utils as tu
from helpers import load, save_steps, truncate_array_files

from ddae_jax import config_checks, config_lib, train
from ddae_jax.weights import pretrained


def _fake_run(workdir, config, steps=(4,)):
  """A workdir as a run leaves it: config.json and checkpoints (of a stand-in state)."""
  pretrained.save_config(workdir, config)
  save_steps(os.path.join(workdir, "checkpoints"), steps)


# ------------------------------------------------------------- 15.1 and 15.2
def test_resume_with_another_model_or_batch_refuses_and_keeps_the_record(tmp_path):
  workdir = str(tmp_path / "run")
  _fake_run(workdir, config_lib.tiny_config())
  before = open(os.path.join(workdir, "config.json")).read()
  requested = config_lib.tiny_config()
  requested.model.patch_size, requested.model.size, requested.batch_size = 8, "small", 32
  with pytest.raises(config_lib.ConfigError) as err:
    train.train_and_evaluate(requested, workdir)
  message = str(err.value)
  for line in ("config.model.patch_size: saved 4, requested 8",
               "config.model.size: saved 'tiny', requested 'small'",
               "config.batch_size: saved 16, requested 32"):
    assert line in message, message
  assert "steps of the saved batch size" in message
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert tu.checkpoint_steps(workdir) == [4]


def test_resume_differences_ignore_run_time_and_schedule_fields():
  saved = json.loads(config_lib.tiny_config().to_json())  # JSON: tuples become lists
  saved["num_train_images"], saved["epochs"] = 1497, 3.0
  requested = config_lib.tiny_config()
  requested.model.dtype, requested.sharding.mesh = "bfloat16", (("data", 1), ("fsdp", -1))
  assert config_checks.resume_differences(saved, requested) == []
  requested.dds.blocks = (2, 4)
  assert config_checks.resume_differences(saved, requested) == [("dds.blocks", (), (2, 4))]


# ------------------------------------------------------------- 15.3
@pytest.mark.slow  # two compiling subprocesses
def test_trainer_resumes_past_a_damaged_checkpoint_and_refuses_another_model(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = ("--config.epochs=1.5", "--config.checkpoint_every_steps=4",
               "--config.optim.warmup_epochs=0.5")  # 24 steps
  first = tu.run(tu.main_cmd(workdir, *overrides), 1)
  assert first.returncode == 0, first.stdout[-3000:]
  other = tu.run(tu.main_cmd(workdir, *overrides, "--config.model.patch_size=8"), 1)
  assert other.returncode != 0 and "config.model.patch_size: saved 4, requested 8" in other.stdout
  assert "Traceback" not in other.stdout and "Event loop is closed" not in other.stdout
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["patch_size"] == 4
  truncate_array_files(os.path.join(workdir, "checkpoints", "24"))
  longer = tu.run(tu.main_cmd(workdir, "--config.epochs=2", "--config.checkpoint_every_steps=4",
                              "--config.optim.warmup_epochs=0.5"), 1)
  assert longer.returncode == 0, longer.stdout[-3000:]
  assert "Resumed from step 20; skipped damaged step(s) [24]" in longer.stdout
  assert "Traceback" not in longer.stdout
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["24"]
  assert tu.checkpoint_steps(workdir)[-1] == 32


# ------------------------------------------------------------- 15.7
@pytest.mark.parametrize("field,value,expected", [
    ("dds.beta_init", ("abc",), "a number in each element"),
    ("optim.base_lr", "abc", "a number"),
    ("batch_size", 16.5, "an integer"),
    ("pixel.enabled", 1, "a bool"),
    ("dds.blocks", (1.5, 4), "an integer in each element"),
    ("sharding.mesh", (("data", "all"), ("fsdp", 1)), "tuple elements like"),
])
def test_wrong_override_types_name_the_field(field, value, expected):
  config = config_lib.tiny_config()
  section, name = field.rsplit(".", 1) if "." in field else ("", field)
  with config.ignore_type():
    (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.{field} = .* has the wrong type: "
                     f"expected {expected}"):
    config_checks.validate(config)


def test_right_types_pass_including_ints_for_floats():
  config = config_lib.tiny_config()
  config.optim.base_lr, config.dds.beta_init, config.dds.blocks = 1, (-1, 0.5, 0, 2), (1, 2, 3, 4)
  config_checks.validate(config)


def test_a_wrong_type_on_the_command_line_fails_before_writing(tmp_path):
  workdir = tmp_path / "run"
  proc = tu.run(tu.main_cmd(str(workdir), "--config.dds.beta_init=abc"), 1, timeout=120)
  assert proc.returncode != 0
  assert "config.dds.beta_init = ('abc',) has the wrong type" in proc.stdout
  assert "Traceback" not in proc.stdout and not (workdir / "config.json").exists()


# ------------------------------------------------------------- 15.6
def test_smoke_is_a_fixed_number_of_steps_whatever_the_dataset():
  config = load("configs/vitb.py", "smoke")
  for images in (240, 1_281_167):
    config.num_train_images = images
    assert config_lib.total_steps(config) == 20
  assert config.log_every_steps == 1
  config_checks.validate(config)
  assert config_lib.total_steps(load("configs/vitb.py")) == round(100 * 1_281_167 / 4096)


@pytest.mark.slow  # a compiling subprocess
def test_smoke_run_logs_every_step_on_real_data(tmp_path):
  workdir = tmp_path / "run"
  proc = tu.run(tu.main_cmd(str(workdir), "--config.data.source=digits",
                            config="configs/tiny.py:smoke"), 1)
  assert proc.returncode == 0, proc.stdout[-3000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert tu.checkpoint_steps(str(workdir))[-2:] == [10, 20]  # (Orbax also saves the first step)
  # The config is saved as given; what the run derived from its data is in run.json.
  assert json.load(open(workdir / "config.json"))["num_train_images"] == 256
  assert json.load(open(workdir / "run.json"))["num_train_images"] == 1497
  assert json.load(open(workdir / "run.json"))["total_steps"] == 20


# ------------------------------------------------------------- 15.4
@pytest.mark.slow  # a compiling subprocess with slow steps
def test_sigterm_with_slow_steps_saves_and_exits_within_a_few_steps(tmp_path):
  import signal
  import time
  workdir = str(tmp_path / "run")
  # Batches of 32 with the tests' unoptimised XLA code: steps of about a
  # second on a 2-core CPU, while the host makes batches far faster.
  proc = tu.start(tu.main_cmd(workdir, "--config.batch_size=32", "--config.epochs=25",
                              "--config.checkpoint_every_steps=5",
                              "--config.log_every_steps=1000"), 1)  # 200 steps

  def wait_for_checkpoint(step):
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
      if tu.checkpoint_steps(workdir) and tu.checkpoint_steps(workdir)[-1] >= step:
        return time.time()
      time.sleep(0.02)
    raise AssertionError(proc.output()[-3000:])

  t5 = wait_for_checkpoint(5)
  t10 = wait_for_checkpoint(10)
  step_time = (t10 - t5) / 5
  proc.send_signal(signal.SIGTERM)
  signalled = time.time()
  assert proc.wait(timeout=300) == 0, proc.output()[-3000:]
  latency = time.time() - signalled
  stopped = tu.checkpoint_steps(workdir)[-1]
  assert "Stopped at step %d for preemption" % stopped in proc.output()
  # At most steps_in_flight (2) steps, the one being prepared and the save.
  assert 10 <= stopped <= 10 + 4 and stopped < 200, stopped
  assert latency < 4 * step_time + 10.0, (latency, step_time)


# ------------------------------------------------------------- 15.5
def _folder(root, per_class=3, good=True):
  from PIL import Image
  for cls in ("cat", "dog"):
    os.makedirs(os.path.join(root, "train", cls))
    for i in range(per_class):
      path = os.path.join(root, "train", cls, f"{i}.jpg")
      if good:
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(path)
      else:
        with open(path, "wb") as f:
          f.write(b"\xff\xd8\xff\xe0 not a jpeg")
  return root


def test_a_folder_where_nothing_decodes_stops_naming_it_and_each_file(tmp_path, caplog):
  import logging

  from ddae_jax import sharding
  from ddae_jax.data import pipeline, sources
  root = _folder(str(tmp_path / "bad"), good=False)
  source = sources.make_source(_data(root), 32, 0, 4, 0, 1)
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:1])
  loader = pipeline.TrainLoader(source, sharding.batch_sharding(mesh), local_batch=4,
                                image_size=32, seed=0, workers=1, max_failures=10)
  with caplog.at_level(logging.WARNING), \
      pytest.raises(sources.InputUnreadable, match=f"1[0-2] images in a row could not be decoded "
                    f"from image folder {root}, split 'train'"):
    next(loader)
  loader.close()
  skips = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
  assert 10 <= len(skips) <= 12  # bounded: chunks of the local batch
  assert all(os.path.join(root, "train") in m and ".jpg" in m for m in skips), skips[:2]


def _data(folder):
  data = config_lib.tiny_config().data
  data.source, data.folder = "image_folder", folder
  return data


def test_a_folder_pointing_at_the_split_says_what_layout_was_expected(tmp_path):
  from ddae_jax.data import sources
  root = _folder(str(tmp_path / "images"))
  with pytest.raises(sources.DatasetMissing) as err:
    sources.make_source(_data(os.path.join(root, "train")), 32, 0, 4, 0, 1)
  message = str(err.value)
  assert "has no 'train' folder" in message
  assert "<folder>/train/<class name>/<image file>" in message
  assert "Found: cat/ (3 images), dog/ (3 images)" in message
  assert f"--config.data.folder={root}" in message
  os.makedirs(tmp_path / "empty" / "train" / "cat")
  with pytest.raises(sources.DatasetMissing, match="has no <class name>/<image file> inside"):
    sources.make_source(_data(str(tmp_path / "empty")), 32, 0, 4, 0, 1)
  assert sources.make_source(_data(root), 32, 0, 4, 0, 1).num_examples == 6


@pytest.mark.slow  # a compiling subprocess
def test_trainer_on_an_undecodable_folder_stops_with_one_message(tmp_path):
  root = _folder(str(tmp_path / "bad"), per_class=40, good=False)
  proc = tu.run(tu.main_cmd(str(tmp_path / "run"), "--config.data.source=image_folder",
                            f"--config.data.folder={root}"), 1, timeout=300)
  assert proc.returncode != 0 and "images in a row could not be decoded" in proc.stdout
  assert "Traceback" not in proc.stdout
  assert proc.stdout.count("Skipping undecodable image") <= 100 + 16
