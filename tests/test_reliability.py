"""A run never loses its way: resume checks, damaged checkpoints, override types, smoke runs,
preemption, bad input (issue 15)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_utils as tu

from ddae_jax import config_checks, config_lib, runtime, train
from ddae_jax.weights import checkpoints, pretrained


def _small_state(width=4):
  return {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones((width, 3))},
          "opt_state": (jnp.zeros((width, 3)),)}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return runtime.with_shardings(jax.eval_shape(lambda: state),
                                   jax.tree.map(lambda _: sharding, state))


def _save_steps(directory, steps, width=4):
  ckpt = checkpoints.Checkpointer(directory, 1, 10, use_async=False)
  for s in steps:
    state = jax.tree.map(lambda x, s=s: x + s, _small_state(width))
    ckpt.save(s, dict(state, step=jnp.asarray(s, jnp.int32)), data_position=10 * s, force=True)
  ckpt.close()


def _fake_run(workdir, config, steps=(4,)):
  """A workdir as a run leaves it: config.json and checkpoints (of a stand-in state)."""
  pretrained.save_config(workdir, config)
  _save_steps(os.path.join(workdir, "checkpoints"), steps)


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


def test_a_checkpoint_of_another_state_tree_names_the_arrays(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1], width=4)
  with pytest.raises(checkpoints.StateMismatch, match=r"params/w: checkpoint \(4, 3\), "
                     r"requested \(8, 3\)"):
    checkpoints.check_tree(directory, 1, _abstract(_small_state(8)))
  checkpoints.check_tree(directory, 1, _abstract(_small_state(4)))  # the same tree passes


# ------------------------------------------------------------- 15.3
def _truncate_array_files(step_dir):
  """Halves each of the step's array data files (OCDBT's `d/` folders)."""
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files if os.path.basename(d) == "d" else ():
      path = os.path.join(d, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_damaged_latest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
  directory, aside = str(tmp_path / "ckpt"), str(tmp_path / "damaged")
  _save_steps(directory, [1, 2, 3])
  _truncate_array_files(os.path.join(directory, "3"))
  os.remove(os.path.join(directory, "2", "state", "_METADATA"))
  ckpt = checkpoints.Checkpointer(directory, 1, 10)
  state, position, step = ckpt.restore_latest_intact(_abstract(_small_state()), aside)
  assert (step, position, int(state["step"])) == (1, 10, 1)
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
  # The damaged steps are kept for inspection, out of the way of new saves.
  assert sorted(os.listdir(aside)) == ["2", "3"] and ckpt.manager.all_steps() == [1]
  ckpt.save(2, state, 20, force=True)  # the step number a damaged one had is free again
  ckpt.close()
  assert checkpoints.Checkpointer(directory, 1, 10).manager.all_steps() == [1, 2]


def test_no_intact_checkpoint_stops_naming_each_damaged_step(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2])
  for step in ("1", "2"):
    os.remove(os.path.join(directory, step, "state", "_METADATA"))
  ckpt = checkpoints.Checkpointer(directory, 1, 10)
  with pytest.raises(checkpoints.CheckpointDamaged, match=r"step 2: .*; step 1: "):
    ckpt.restore_latest_intact(_abstract(_small_state()), str(tmp_path / "aside"))
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved: the user decides


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
  _truncate_array_files(os.path.join(workdir, "checkpoints", "24"))
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
  import runpy
  get_config = runpy.run_path(os.path.join(tu.REPO, "configs/vitb.py"))["get_config"]
  config = get_config("smoke")
  for images in (240, 1_281_167):
    config.num_train_images = images
    assert config_lib.total_steps(config) == 20
  assert config.log_every_steps == 1
  config_checks.validate(config)
  assert config_lib.total_steps(get_config("")) == round(100 * 1_281_167 / 4096)


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
def test_steps_in_flight_waits_on_the_step_depth_behind_and_counts_completed():
  from ddae_jax import runtime
  in_flight = runtime.StepsInFlight(depth=2, start_step=10)
  advanced = [in_flight.push(s, {"loss": jnp.float32(s)}) for s in range(11, 16)]
  assert advanced == [False, False, True, True, True]
  assert in_flight.completed == 13  # 14 and 15 may still run
  assert len(in_flight._pending) == 2


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


def _epochs(epochs):
  config = config_lib.tiny_config()
  config.epochs = epochs
  return config
