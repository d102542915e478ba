"""The metrics writer: metrics.jsonl kept across resumes, locally and on object stores."""

import numpy as np


def test_jsonl_writer_appends_locally_and_rewrites_on_object_stores(tmp_path):
  import json

  from ddae_jax.metrics import JsonlWriter
  for append in (True, False):
    workdir = tmp_path / f"append_{append}"
    for run in range(2):  # a resumed run keeps the earlier rows
      w = JsonlWriter(str(workdir), append=append)
      w.write_scalars(run * 10 + 1, {"loss": 1.5, "beta/shared/block_1": np.float32(-0.5)})
      w.flush()
      w.write_scalars(run * 10 + 2, {"loss": 1.0})
      w.close()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 11, 12]
    assert rows[0]["beta/shared/block_1"] == -0.5
  assert JsonlWriter(str(tmp_path / "x")).append
