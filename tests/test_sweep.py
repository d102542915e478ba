"""The ablation sweep's command lines: one per row of a table, each with its own workdir."""

from ddae_jax import sweep


def test_sweep_prints_one_command_per_row(capsys):
  assert sweep.main(["--table=table7", "--workdir_root=gs://b/abl"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
  assert len(lines) == 6
  assert "--config=configs/mae_vits.py:dds_mae,beta_fixed_0" in lines[0]
  assert "--workdir=gs://b/abl/table7/mae_vits-dds_mae-beta_fixed_0" in lines[0]
  assert len({line.split("--workdir=")[1] for line in lines}) == 6
