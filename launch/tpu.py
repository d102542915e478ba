#!/usr/bin/env python3
r"""Runs ddae-jax on a Cloud TPU VM slice (one host or a pod) through gcloud.

  python launch/tpu.py create  --project=P --zone=us-central2-b --accelerator=v4-64
  python launch/tpu.py setup   --project=P ...          # ship this commit, pip install [tpu]
  python launch/tpu.py run     --project=P --bucket=gs://B --config=configs/vitb.py
  python launch/tpu.py watch   --project=P --bucket=gs://B
  python launch/tpu.py resume  --project=P --bucket=gs://B   # after a preemption
  python launch/tpu.py delete  --project=P

Every setting is a flag or an environment variable (DDAE_<NAME>, e.g.
DDAE_PROJECT, DDAE_ZONE); flags win. --dry-run prints the exact gcloud commands
instead of running them. Settings are checked before any gcloud call.

Provisioning (--provisioning): "spot" (default) is about 60-70% cheaper than
on-demand but can be preempted at any time: the trainer saves on SIGTERM and
`resume` recreates the slice and continues from the workdir. "queued" asks for
a queued resource (spot capacity, waits until the slice is free: best for
large pods); "on-demand" is never preempted and costs the most.

Runtime (--runtime): by default the TPU software version Google documents for
the accelerator's generation (RUNTIMES: v2-v4 tpu-ubuntu2204-base, v5e
v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e); a flag or
DDAE_RUNTIME overrides it.

--preflight (create, run, resume): first compiles the run's step for the
accelerator on this machine (python -m ddae_jax.aot, needs libtpu, no TPU) and
stops before any gcloud call when it does not fit in the chips' memory.

Remote commands are built with shlex.quote, so no setting reaches a shell
unquoted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATOR = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-\d+$")
PROVISIONING = ("spot", "queued", "on-demand")
BINARIES = ("ddae_jax.main", "ddae_jax.finetune", "ddae_jax.linear_probe", "ddae_jax.knn")
# cloud.google.com/tpu/docs/runtimes: the base image of each generation.
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
            "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Binaries whose step ddae_jax.aot compiles, and its --binary for them.
AOT_BINARIES = {"ddae_jax.main": "main", "ddae_jax.finetune": "finetune"}
REMOTE_DIR = "ddae"  # under the remote home directory
LOG_DIR = "ddae_logs"

SETTINGS = {  # name: (default, help)
    "project": (None, "Google Cloud project (required)."),
    "zone": ("us-central2-b", "Zone of the TPU."),
    "name": ("ddae", "Name of the TPU VM (and queued resource)."),
    "accelerator": ("v4-64", "Accelerator type, e.g. v4-8, v4-64, v5litepod-64, v5p-128."),
    "runtime": (None, "TPU software version (runtime); default: the accelerator's, "
                "from RUNTIMES."),
    "provisioning": ("spot", "spot | queued | on-demand (see the cost note above)."),
    "bucket": (None, "gs:// bucket for workdirs (required by run, watch, resume)."),
    "config": ("configs/vitb.py", "Config file, relative to the repo, with :variants."),
    "workdir": (None, "Run directory; default <bucket>/<name>."),
    "binary": ("ddae_jax.main", f"Module to run: one of {BINARIES}."),
}


class SettingError(ValueError):
  pass


def parse(argv):
  parser = argparse.ArgumentParser(
      prog="launch/tpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=("create", "setup", "run", "watch", "resume",
                                          "delete"))
  for name, (default, text) in SETTINGS.items():
    env = f"DDAE_{name.upper()}"
    parser.add_argument(f"--{name}", default=os.environ.get(env, default),
                        help=f"{text} Env: {env}. Default: {default}.")
  parser.add_argument("--override", action="append", default=[],
                      help="Extra flag for the binary, e.g. --override=--config.batch_size=1024 "
                           "(repeatable).")
  parser.add_argument("--preflight", action="store_true",
                      help="Compile the step for the accelerator here first (ddae_jax.aot); "
                           "stop if it does not fit.")
  parser.add_argument("--dry-run", action="store_true",
                      help="Print the gcloud commands instead of running them.")
  return parser.parse_args(argv)


def check(args):
  """Fails on a missing or bad setting, naming it, before any gcloud call."""
  if not args.project:
    raise SettingError("setting 'project' is missing: pass --project or set DDAE_PROJECT")
  if not args.zone:
    raise SettingError("setting 'zone' is missing: pass --zone or set DDAE_ZONE")
  if not re.fullmatch(r"[a-z0-9-]+", args.name or ""):
    raise SettingError(f"setting 'name' = {args.name!r}: use lowercase letters, digits, '-'")
  if not ACCELERATOR.match(args.accelerator or ""):
    raise SettingError(f"setting 'accelerator' = {args.accelerator!r}: expected e.g. v4-8, "
                       "v4-64, v5litepod-64, v5p-128")
  if args.provisioning not in PROVISIONING:
    raise SettingError(f"setting 'provisioning' = {args.provisioning!r}: one of {PROVISIONING}")
  if args.binary not in BINARIES:
    raise SettingError(f"setting 'binary' = {args.binary!r}: one of {BINARIES}")
  if args.command in ("run", "watch", "resume"):
    if not (args.bucket or "").startswith("gs://"):
      raise SettingError(f"setting 'bucket' = {args.bucket!r}: a gs:// bucket is required "
                         f"by '{args.command}' (--bucket or DDAE_BUCKET)")
    config_file = args.config.split(":")[0]
    if not os.path.isfile(os.path.join(REPO, config_file)):
      raise SettingError(f"setting 'config' = {args.config!r}: no file {config_file} in {REPO}")
  for flag in args.override:
    if not flag.startswith("--"):
      raise SettingError(f"setting 'override' = {flag!r}: each override is a --flag=value")
  if args.preflight:
    if args.command not in ("create", "run", "resume"):
      raise SettingError(f"setting 'preflight': only for create, run and resume, "
                         f"not '{args.command}'")
    if args.binary not in AOT_BINARIES:
      raise SettingError(f"setting 'preflight': ddae_jax.aot compiles {sorted(AOT_BINARIES)}, "
                         f"not {args.binary!r}")
  args.runtime = args.runtime or RUNTIMES[args.accelerator.split("-")[0]]
  args.workdir = args.workdir or f"{(args.bucket or '').rstrip('/')}/{args.name}"


def _where(args):
  return ["--project", args.project, "--zone", args.zone]


def create_commands(args):
  if args.provisioning == "queued":
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
             "--node-id", args.name, *_where(args), "--accelerator-type", args.accelerator,
             "--runtime-version", args.runtime, "--spot"]]
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
         "--accelerator-type", args.accelerator, "--version", args.runtime]
  return [cmd + (["--spot"] if args.provisioning == "spot" else [])]


def _ssh(args, command: str, worker: str = "all"):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args),
          f"--worker={worker}", "--command", command]


def commit() -> str:
  return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()


def setup_commands(args):
  sha = commit()
  archive = f"/tmp/ddae-{sha}.tar.gz"
  remote = (f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} ~/{LOG_DIR} && "
            f"tar xzf ~/ddae-{sha}.tar.gz -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && "
            "python3 -m pip install -q -e '.[tpu]'")
  return [["git", "-C", REPO, "archive", "--format=tar.gz", "-o", archive, "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:~/",
           *_where(args), "--worker=all"],
          _ssh(args, remote)]


def train_invocation(args) -> str:
  """The same `python3 -m ...` line for every worker."""
  parts = ["python3", "-m", args.binary, f"--config={args.config}",
           f"--workdir={args.workdir}", *args.override]
  return " ".join(shlex.quote(p) for p in parts)


def run_commands(args):
  log = f"~/{LOG_DIR}/{args.name}.log"
  remote = (f"cd ~/{REMOTE_DIR} && nohup {train_invocation(args)} >> {log} 2>&1 "
            "< /dev/null &")
  return [_ssh(args, remote)]


def watch_commands(args):
  return [_ssh(args, f"tail -n 50 ~/{LOG_DIR}/{args.name}.log", worker="0"),
          ["gcloud", "storage", "ls", f"{args.workdir.rstrip('/')}/checkpoints/"]]


def delete_commands(args):
  if args.provisioning == "queued":
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name,
             *_where(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args),
           "--quiet"]]


def describe_command(args):
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args),
          "--format=value(state)"]


def preflight_command(args):
  """ddae_jax.aot for the run's config, binary and config overrides on this accelerator."""
  return [sys.executable, "-m", "ddae_jax.aot", f"--config={os.path.join(REPO, args.config)}",
          f"--topology={args.accelerator}", f"--binary={AOT_BINARIES[args.binary]}",
          *[f for f in args.override if f.startswith("--config.")]]


def preflight(args) -> bool:
  """Runs the compile check (prints its JSON line); False when the step does not fit."""
  cmd = preflight_command(args)
  print(" ".join(shlex.quote(c) for c in cmd), flush=True)
  if args.dry_run:
    return True
  proc = subprocess.run(cmd, text=True, capture_output=True, cwd=REPO)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    print(f"error: preflight failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return False
  print(lines[-1], flush=True)
  row = json.loads(lines[-1])
  if not row.get("fits"):
    print(f"error: the step does not fit on {args.accelerator}: {row.get('total_gb')} GB of "
          f"{row.get('hbm_gb')} GB per chip; lower --config.batch_size or use fsdp",
          file=sys.stderr)
  return bool(row.get("fits"))


def execute(cmds, dry_run: bool, capture_last: bool = False):
  out = None
  for cmd in cmds:
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if dry_run:
      continue
    proc = subprocess.run(cmd, check=True, text=True,
                          capture_output=capture_last and cmd is cmds[-1])
    out = proc.stdout
  return out


def last_checkpoint(listing: str | None):
  steps = [int(m) for m in re.findall(r"/checkpoints/(\d+)/", listing or "")]
  return max(steps) if steps else None


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  try:
    check(args)
  except SettingError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.preflight and not preflight(args):
    return 3
  if args.command == "create":
    execute(create_commands(args), args.dry_run)
  elif args.command == "setup":
    execute(setup_commands(args), args.dry_run)
  elif args.command == "run":
    execute(run_commands(args), args.dry_run)
  elif args.command == "watch":
    execute(watch_commands(args)[:1], args.dry_run)
    listing = execute(watch_commands(args)[1:], args.dry_run, capture_last=True)
    if not args.dry_run:
      print(f"last checkpoint step: {last_checkpoint(listing)}")
  elif args.command == "delete":
    execute(delete_commands(args), args.dry_run)
  elif args.command == "resume":
    # A preempted spot slice is gone or PREEMPTED: recreate it, reinstall, rerun
    # the same command; the trainer resumes from the workdir's last checkpoint.
    print(" ".join(shlex.quote(c) for c in describe_command(args)), flush=True)
    state = ""
    if not args.dry_run:
      proc = subprocess.run(describe_command(args), text=True, capture_output=True)
      state = proc.stdout.strip() if proc.returncode == 0 else "MISSING"
    if args.dry_run or state != "READY":
      if state not in ("MISSING", ""):
        execute(delete_commands(args), args.dry_run)
      execute(create_commands(args) + setup_commands(args), args.dry_run)
    execute(run_commands(args), args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(main())
