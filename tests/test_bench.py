"""The step benchmark (`python -m ddae_jax.bench`): one JSON line, and no TensorFlow."""


def test_bench_prints_one_json_line_and_imports_no_tensorflow():
  import json

  import trainer_utils as tu
  cmd = [tu.sys.executable, "-m", "ddae_jax.bench", f"--config={tu.REPO}/configs/tiny.py",
         "--steps=3", "--warmup=1"]
  proc = tu.run(cmd, 2)
  assert proc.returncode == 0, proc.stdout[-3000:]
  row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
  for key in ("config", "batch", "devices", "chip", "step_ms_median", "step_ms_p10",
              "step_ms_p90", "images_per_s", "gflops_per_image", "achieved_tflops", "mfu",
              "peak_memory_gb"):
    assert key in row, key
  assert row["batch"] == 16 and row["devices"] == 2 and row["images_per_s"] > 0
  probe = tu.run([tu.sys.executable, "-c",
                  "import sys, ddae_jax.bench, ddae_jax.train, ddae_jax.metrics;"
                  "import ddae_jax.data.pipeline, ddae_jax.data.sources;"
                  "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"], 1)
  assert probe.returncode == 0, probe.stdout[-2000:]
