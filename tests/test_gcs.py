"""gs:// as a TPU VM user has it, against a real local GCS server (fake-gcs-server, 127.0.0.1).

Every binary runs in a subprocess with its workdir, init_dir or file on
gs://; the clients reach the server through their documented settings
(gcs_server.Server.env): etils.epath through gcsfs (EPATH_USE_TF=false) and
Orbax's TensorStore through TENSORSTORE_GCS_HTTP_URL. TensorFlow's own GCS
file system (TensorBoard events, TFDS reading from a gs:// data_dir) has a
fixed Google endpoint and is not exercised here (README, "Storage on gs://").
"""

import json
import os
import random
import signal
import sys
import time

import gcs_server
import jax
import numpy as np
import pytest
import trainer_utils as tu

pytestmark = pytest.mark.slow  # compiling subprocesses against a server process

OVERRIDES = ("--config.epochs=2", "--config.checkpoint_every_steps=4",
             "--config.log_every_steps=4")  # 256 synthetic images, batch 16: 32 steps


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  server = gcs_server.Server(str(tmp_path_factory.mktemp("gcs")))
  yield server
  server.stop()


def _run(gcs, cmd, devices=1, timeout=600):
  proc = tu.run(cmd, devices, timeout=timeout, extra=gcs.env)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
  return proc


def _gs(run):
  return f"gs://{gcs_server.BUCKET}/{run}"


def _leaves(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_state(a, b):
  flat_b = _leaves(b)
  assert set(_leaves(a)) == set(flat_b)
  for path, leaf in _leaves(a).items():
    np.testing.assert_array_equal(leaf, flat_b[path], err_msg=path)


def test_pretraining_on_gs_resumes_bit_identically_and_sets_a_damaged_checkpoint_aside(
    gcs, tmp_path):
  local = str(tmp_path / "local")
  reference = tu.start(tu.main_cmd(local, *OVERRIDES), 1)
  # SIGKILL once a checkpoint of step >= 12 is on the server, at a random moment.
  run = "killed"
  first = tu.start(tu.main_cmd(_gs(run), *OVERRIDES), 1, log_path=str(tmp_path / "first.log"),
                   extra=gcs.env)
  t0 = time.time()
  while first.poll() is None and time.time() - t0 < 300:
    if gcs.checkpoint_steps(run) and gcs.checkpoint_steps(run)[-1] >= 12:
      time.sleep(random.uniform(0.0, 1.0))
      first.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  assert first.wait(timeout=60) == -signal.SIGKILL, first.output()[-3000:]
  killed_at = gcs.checkpoint_steps(run)[-1]
  assert 12 <= killed_at < 32, killed_at
  resumed = _run(gcs, tu.main_cmd(_gs(run), *OVERRIDES))
  assert f"Resumed from {_gs(run)}/checkpoints, step {killed_at}" in resumed.stdout
  assert reference.wait(timeout=600) == 0, reference.output()[-3000:]

  # The run's record on the server.
  names = set(gcs.names(f"{run}/"))
  assert {f"{run}/config.json", f"{run}/run.json", f"{run}/metrics.jsonl"} <= names
  assert json.loads(gcs.read(f"{run}/run.json"))["total_steps"] == 32
  rows = [json.loads(line) for line in gcs.read(f"{run}/metrics.jsonl").decode().splitlines()]
  logged = [r["step"] for r in rows if "loss" in r]
  assert logged[-1] == 32 and set(range(killed_at + 4, 33, 4)) <= set(logged)
  assert gcs.checkpoint_steps(run)[-1] == 32
  # Bit-identical to the uninterrupted local run: every array and input position.
  copy = gcs.download(run, str(tmp_path / "copy"))
  a, data_a = tu.load_state(local, 32)
  b, data_b = tu.load_state(copy, 32)
  assert data_a == data_b
  _assert_same_state(a, b)

  # The newest checkpoint damaged on the server: skipped, set aside, resumed from the one before.
  for name in gcs.names(f"{run}/checkpoints/32/state/"):
    if "/d/" in name:
      data = gcs.read(name)
      gcs.write(name, data[:len(data) // 2])
  longer = _run(gcs, tu.main_cmd(_gs(run), "--config.epochs=2.5", *OVERRIDES[1:]))
  assert "Resumed from step 28; skipped damaged step(s) [32]" in longer.stdout
  assert f"moved to {_gs(run)}/damaged_checkpoints" in longer.stdout
  assert any(n.startswith(f"{run}/damaged_checkpoints/32/") for n in gcs.names(f"{run}/"))
  assert gcs.checkpoint_steps(run)[-1] == 40


@pytest.fixture(scope="module")
def pretrained_on_gs(gcs):
  """A short tiny-ViT pretraining run (32 px, patch 4: the quickstart's model) on gs://."""
  _run(gcs, tu.main_cmd(_gs("pre"), "--config.epochs=0.5", "--config.optim.warmup_epochs=0.25"))
  return "pre"


def _eval_cmd(binary, workdir, init_dir, *extra):
  config = os.path.join(tu.REPO, "configs", f"{binary}_quickstart.py")
  return [sys.executable, "-m", f"ddae_jax.{binary}", f"--config={config}",
          f"--workdir={workdir}", f"--config.init_dir={init_dir}", "--config.batch_size=32",
          "--config.eval_batch_size=32", "--config.data.workers=1", *extra]


@pytest.mark.parametrize("binary", ["finetune", "linear_probe", "knn"])
def test_evaluation_binaries_restore_from_gs_and_write_their_workdir_there(
    gcs, pretrained_on_gs, binary):
  training = () if binary == "knn" else ("--config.epochs=0.05", "--config.optim.warmup_epochs=0",
                                         "--config.encoder=online")
  out = f"{binary}_on_gs"
  _run(gcs, _eval_cmd(binary, _gs(out), _gs(pretrained_on_gs), *training), devices=2)
  results = json.loads(gcs.read(f"{out}/results.json"))
  assert results["count"] == 300  # every test digit once
  if binary != "knn":
    assert results["step"] == 2 and gcs.checkpoint_steps(out) == [2]


def test_convert_exports_to_and_imports_from_gs(gcs, pretrained_on_gs, tmp_path):
  exported = f"{_gs('exports')}/encoder.safetensors"
  convert = [sys.executable, "-m", "ddae_jax.convert"]
  _run(gcs, [*convert, "export", f"--workdir={_gs(pretrained_on_gs)}", f"--out={exported}"])
  _run(gcs, [*convert, "export", f"--workdir={_gs(pretrained_on_gs)}",
             f"--out={_gs('exports')}/encoder.pth", "--layout=mae_pretrain"])
  local = str(tmp_path / "encoder.safetensors")
  _run(gcs, [*convert, "export", f"--workdir={_gs(pretrained_on_gs)}", f"--out={local}"])
  import io

  import safetensors
  import torch
  from safetensors.numpy import load, load_file
  # The same tensors and metadata (the header's key order is not fixed, so not the bytes).
  on_gs, here = gcs.read("exports/encoder.safetensors"), load_file(local)
  _assert_same_state(load(on_gs), here)
  with safetensors.safe_open(local, "np") as f:
    assert json.loads(on_gs[8:8 + int.from_bytes(on_gs[:8], "little")])["__metadata__"] == (
        f.metadata())
  nested = torch.load(io.BytesIO(gcs.read("exports/encoder.pth")), weights_only=True)
  _assert_same_state({k: v.numpy() for k, v in nested["model"].items()}, here)

  # Import from gs:// into gs://, and from the local file locally: the same encoder.
  _run(gcs, [*convert, "import", f"--from={exported}", f"--out={_gs('imported')}"])
  _run(gcs, [*convert, "import", f"--from={local}", f"--out={tmp_path / 'imported'}"])
  assert "imported/imported_from.json" in gcs.names("imported/")
  from ddae_jax.weights import pretrained
  on_gs, _ = pretrained.load_encoder(gcs.download("imported", str(tmp_path / "copy")), "online")
  here, _ = pretrained.load_encoder(str(tmp_path / "imported"), "online")
  _assert_same_state(here, on_gs)


def test_analyze_reads_a_run_on_gs(gcs, pretrained_on_gs, tmp_path):
  copy = gcs.download(pretrained_on_gs, str(tmp_path / "copy"))
  for command in ("beta", "attention-distance"):
    outputs = []
    for workdir, out in ((_gs(pretrained_on_gs), tmp_path / "gs"), (copy, tmp_path / "here")):
      extra = ("--num_images=2",) if command == "attention-distance" else ()
      _run(gcs, [sys.executable, "-m", "ddae_jax.analyze", command, f"--workdir={workdir}",
                 "--label=run", f"--out={out}", *extra])
      text = (out / f"{command}.json").read_text()
      assert command == "beta" or f'"workdir": "{workdir}"' in text
      outputs.append(_comparable(json.loads(text)))
    assert outputs[0] == outputs[1], command


def _comparable(tree):
  """A command's JSON without its wall times and the workdir it names."""
  if isinstance(tree, dict):
    return {k: _comparable(v) for k, v in tree.items()
            if not k.startswith("seconds") and k != "workdir"}
  return [_comparable(v) for v in tree] if isinstance(tree, list) else tree
