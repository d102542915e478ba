"""The pretraining binary: checkpoints, metrics, resume after SIGKILL, two hosts, errors."""

import glob
import json
import os
import random
import signal
import time

import jax
import numpy as np
import pytest
import trainer_utils as tu

OVERRIDES = ("--config.epochs=2", "--config.checkpoint_every_steps=4",
             "--config.log_every_steps=4")  # 256 synthetic images, batch 16: 32 steps


def test_run_writes_checkpoints_and_metrics_with_beta(tmp_path):
  workdir = str(tmp_path / "run")
  proc = tu.run(tu.main_cmd(workdir, *OVERRIDES, "--config.keep_checkpoints=2"), 2,
                tensorboard=True)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert tu.checkpoint_steps(workdir) == [28, 32]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in rows if "loss" in r]
  assert [r["step"] for r in logged] == list(range(4, 33, 4))
  for key in ("beta/shared/block_1", "pixel_loss/block_4", "distill_loss/block_2",
              "beta_regularizer", "learning_rate", "ema_momentum", "distill_weight", "grad_norm",
              "param_norm", "images_per_second", "skipped_images"):
    assert key in logged[-1], key
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(glob.glob(os.path.join(workdir, "events*"))[0])
  events.Reload()
  tags = set(events.Tags()["scalars"]) | set(events.Tags().get("tensors", []))
  assert {"beta/shared/block_1", "beta/shared/block_4", "loss"} <= tags
  # A rerun of the finished run resumes at the end and does nothing more.
  again = tu.run(tu.main_cmd(workdir, *OVERRIDES, "--config.keep_checkpoints=2"), 2)
  assert again.returncode == 0 and tu.checkpoint_steps(workdir) == [28, 32]
  # --init_dir continues that run in a new workdir (one more epoch: steps 33..48).
  longer = str(tmp_path / "longer")
  more = tu.run(tu.main_cmd(longer, "--config.epochs=3", "--config.checkpoint_every_steps=16",
                            f"--init_dir={workdir}"), 2)
  assert more.returncode == 0, more.stdout[-3000:]
  assert tu.checkpoint_steps(longer)[-1] == 48 and tu.checkpoint_steps(longer)[0] > 32
  missing = tu.run(tu.main_cmd(str(tmp_path / "x"), f"--init_dir={tmp_path / 'nothing'}"), 1)
  assert missing.returncode != 0 and "--init_dir=" in missing.stdout
  assert "Traceback" not in missing.stdout


def _kill_when(proc, workdir, in_flight: bool, min_step: int, timeout=300):
  """SIGKILLs `proc` once a checkpoint >= min_step exists (and, if asked, a save is in flight)."""
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    steps = tu.checkpoint_steps(workdir)
    tmp = glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    if steps and steps[-1] >= min_step and (tmp or not in_flight):
      if not in_flight:
        time.sleep(random.uniform(0.0, 1.0))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return steps[-1]
    time.sleep(0.01)
  proc.wait()
  return None


@pytest.mark.slow  # several compiling subprocesses; CI runs `-m slow`
def test_sigkill_and_restart_ends_with_the_same_parameters(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  ref = tu.start(tu.main_cmd(straight, *OVERRIDES), 1)
  # Kill once while an async save is being written, once at a random moment.
  first = tu.start(tu.main_cmd(killed, *OVERRIDES), 1)
  assert _kill_when(first, killed, in_flight=True, min_step=4) is not None
  second = tu.start(tu.main_cmd(killed, *OVERRIDES), 1)
  assert _kill_when(second, killed, in_flight=False, min_step=12) is not None
  last = tu.run(tu.main_cmd(killed, *OVERRIDES), 1)
  assert last.returncode == 0, last.stdout[-3000:]
  assert ref.wait(timeout=600) == 0, ref.output()[-3000:]
  a, data_a = tu.load_state(straight, 32)
  b, data_b = tu.load_state(killed, 32)
  assert data_a == data_b
  flat_b = dict(_leaves(b))
  for path, leaf in _leaves(a):
    np.testing.assert_array_equal(leaf, flat_b[path], err_msg=path)


def _leaves(tree):
  import jax
  return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.slow  # several compiling subprocesses; CI runs `-m slow`
def test_two_processes_match_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  steps = ("--config.epochs=0.5", "--config.optim.warmup_epochs=0.25",
           "--config.checkpoint_every_steps=8",
           "--config.log_every_steps=8")  # 8 steps
  port = tu.free_port()
  procs = [tu.start(tu.main_cmd(two, *steps, f"--coordinator_address=127.0.0.1:{port}",
                                "--num_processes=2", f"--process_id={i}"), 4)
           for i in range(2)]
  single = tu.run(tu.main_cmd(one, *steps), 8)
  assert single.returncode == 0, single.stdout[-3000:]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.output()[-3000:]
  a, _ = tu.load_state(one, 8)
  b, data = tu.load_state(two, 8)
  assert data["process_count"] == 2 and len(data["positions"]) == 2
  flat_b = dict(_leaves(b))
  # As in test_train_step: the attention key bias has a zero gradient, which
  # Adam normalises from round-off; a fifth of one lr step bounds it.
  atol = 0.2 * 1e-3 * 16 / 256
  for path, leaf in _leaves(a):
    np.testing.assert_allclose(leaf, flat_b[path], rtol=1e-5, atol=atol, err_msg=path)
  rows = [[json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))
           if '"loss"' in line] for w in (one, two)]
  assert rows[0][-1]["loss"] == pytest.approx(rows[1][-1]["loss"], rel=1e-6)


def test_missing_imagenet_fails_at_once_with_instructions(tmp_path):
  proc = tu.run(tu.main_cmd(str(tmp_path / "run"), f"--config.data.data_dir={tmp_path}",
                            config="configs/vitb.py"), 1, timeout=300)
  assert proc.returncode != 0
  assert "ILSVRC2012_img_train.tar" in proc.stdout and "downloads/manual" in proc.stdout
  assert "Traceback" not in proc.stdout


def test_bad_override_names_the_field(tmp_path):
  proc = tu.run(tu.main_cmd(str(tmp_path / "run"), "--config.masking.ratio=1.5"), 1)
  assert proc.returncode != 0 and "config.masking.ratio" in proc.stdout
  assert "Traceback" not in proc.stdout


def test_nan_loss_stops_naming_the_step_and_an_intact_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  proc = tu.run(tu.main_cmd(workdir, "--config.optim.base_lr=1e12",
                            "--config.optim.warmup_epochs=0", "--config.epochs=1",
                            "--config.checkpoint_every_steps=1",
                            "--config.log_every_steps=1"), 1)
  assert proc.returncode != 0
  import re
  found = re.search(r"loss is (nan|inf) at step (\d+); the last good checkpoint is step (\d+)",
                    proc.stdout)
  assert found, proc.stdout[-3000:]
  bad, good = int(found.group(2)), int(found.group(3))
  assert good < bad and tu.checkpoint_steps(workdir)[-1] == good
  state, _ = tu.load_state(workdir, good)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
