"""cli.py: every binary ends a user's error with one line naming the fields, and writes nothing;
the heartbeat timeout reaches jax.distributed (issue 27); the libraries define no flags."""

import os
import sys

import jax
import pytest
import trainer_utils as tu

from ddae_jax import cli

_BAD_SCHEDULE = ("--config.epochs=1.004", "--config.optim.warmup_epochs=1")  # 23 and 23 steps
_ONE_LINE = ("error: config.optim.warmup_epochs = 1.0 ({w} steps) is not shorter than "
             "config.epochs = 1.004 ({w} steps over {n} images at batch 64): the cosine decay "
             "after the warm-up needs at least one step; raise config.epochs or lower "
             "config.optim.warmup_epochs")


@pytest.mark.slow  # five binaries, each a subprocess that imports JAX (and TensorFlow)
@pytest.mark.parametrize("binary,config,extra,images", [
    ("main", "quickstart", (), "1,497"),
    ("finetune", "finetune_quickstart", ("--config.random_init=True",), "1,497"),
    ("linear_probe", "linear_probe_quickstart", ("--config.random_init=True",), "1,497"),
    ("aot", "quickstart", ("--topology=v5e-4",), "256"),  # no data: num_train_images
    ("bench", "quickstart", (), "256"),
])
def test_every_binary_ends_a_schedule_without_decay_steps_with_one_line(
    tmp_path, binary, config, extra, images):
  workdir = tmp_path / "run"
  flags = [f"--workdir={workdir}"] if binary in ("main", "finetune", "linear_probe") else []
  cmd = [sys.executable, "-m", f"ddae_jax.{binary}",
         f"--config={os.path.join(tu.REPO, 'configs', config + '.py')}", *flags, *extra,
         *_BAD_SCHEDULE]
  proc = tu.run(cmd, 1, timeout=300)
  steps = 23 if images == "1,497" else 4
  assert proc.returncode == 1, proc.stdout[-3000:]
  assert proc.stdout.rstrip().splitlines()[-1] == _ONE_LINE.format(w=steps, n=images)
  assert "Traceback" not in proc.stdout
  assert not (workdir / "config.json").exists()


def test_the_heartbeat_timeout_goes_to_jax_and_an_older_jax_refuses_a_changed_one():
  assert cli.heartbeat_option(jax.distributed.initialize, 10) == {
      "heartbeat_timeout_seconds": 10}  # this jax (>= 0.7) takes it

  def initialize_of_jax_0_6(coordinator_address=None, num_processes=None, process_id=None):
    del coordinator_address, num_processes, process_id
  assert cli.heartbeat_option(initialize_of_jax_0_6, 100) == {}  # its fixed value
  with pytest.raises(SystemExit, match=r"--heartbeat_timeout=10 needs jax >= 0\.7"):
    cli.heartbeat_option(initialize_of_jax_0_6, 10)


_IMPORT_THE_LIBRARIES = """
import os
from absl import app, flags, logging
environ = dict(os.environ)
import ddae_jax.perf.aot, ddae_jax.perf.aot_evals, ddae_jax.perf.bench
import ddae_jax.perf.bench_input, ddae_jax.train
ours = {name: module for module, defined in flags.FLAGS.flags_by_module_dict().items()
        for name in (f.name for f in defined) if module.startswith("ddae_jax")}
assert not ours, f"flags defined at import: {ours}"
changed = {k for k in environ.keys() | os.environ.keys() if environ.get(k) != os.environ.get(k)}
assert not changed & {"JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD"}, changed
"""


def test_the_tools_libraries_import_side_by_side_and_define_no_flags():
  """Issue 26: the libraries of aot, bench and bench_input imported with pretraining's in one
  process define no absl flag (two defining --config collided) and set no environment."""
  proc = tu.run([sys.executable, "-c", _IMPORT_THE_LIBRARIES], 1, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:]
