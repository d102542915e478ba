"""The ahead-of-time TPU compile check: slice names, the HLO collectives, the sweep, and
one real compile of the tiny config for a v5e-4 (needs libtpu, not a TPU)."""

import importlib.util
import json

import numpy as np
import pytest

from ddae_jax.perf import aot


@pytest.mark.parametrize("name,topology,chips,hosts", [
    ("v4-8", "v4:2x2x1", 4, 1), ("v4-64", "v4:2x4x4", 32, 8), ("v4-128", "v4:4x4x4", 64, 16),
    ("v5litepod-64", "v5e:8x8", 64, 16), ("v5e-4", "v5e:2x2", 4, 1),
    ("v5e-8", "v5e:2x4", 8, 1), ("v5p-8", "v5:2x2x1", 4, 1), ("v6e-256", "v6e:16x16", 256, 64),
    ("v5e:2x2", "v5e:2x2", 4, 1)])
def test_accelerator_names_map_to_topologies(name, topology, chips, hosts):
  s = aot.parse_slice(name)
  assert (s.topology, s.chips, s.hosts) == (topology, chips, hosts)


@pytest.mark.parametrize("name", ["v4-6", "v9-8", "v5e:9x9x9x9", "tpu"])
def test_unknown_slices_are_named(name):
  with pytest.raises(ValueError, match="--topology"):
    aot.parse_slice(name)


def test_collectives_count_results_not_async_operands():
  hlo = """
  %all-reduce.1 = (f32[64]{0:T(128)S(1)}, /*index=1*/bf16[64,64]{1,0:T(8,128)(2,1)}) all-reduce(%a, %b), channel_id=1
  %all-gather-start.2 = (bf16[4,64]{1,0:T(8,128)}, bf16[16,64]{1,0:T(8,128)}) all-gather-start(%p), dimensions={0}
  %all-gather-done.2 = bf16[16,64]{1,0:T(8,128)} all-gather-done(%all-gather-start.2)
  ROOT %reduce-scatter.3 = f32[8]{0} reduce-scatter(%x), dimensions={0}
  %fusion = f32[8]{0} fusion(%all-reduce.1), kind=kLoop
  """  # noqa: E501 (HLO lines as XLA prints them)
  assert aot.collectives(hlo) == {
      "all-reduce": {"count": 1, "bytes": 64 * 4 + 64 * 64 * 2},
      "all-gather": {"count": 1, "bytes": 16 * 64 * 2},
      "reduce-scatter": {"count": 1, "bytes": 8 * 4}}


def test_sweep_doubles_while_it_fits_and_halves_until_it_does(monkeypatch):
  from ddae_jax import config_lib
  s = aot.parse_slice("v5e-4")
  fits_up_to = {True: 64, False: 8}
  for start_fits, limit in fits_up_to.items():
    config = config_lib.tiny_config()
    config.batch_size = 4 * 16  # 16 per chip
    monkeypatch.setattr(aot, "report", lambda c, *a, limit=limit: {
        "per_chip_batch": c.batch_size // 4, "fits": c.batch_size // 4 <= limit})
    rows = list(aot.sweep(config, "main", s, [None] * 4, 0.1))
    per_chip = [r["per_chip_batch"] for r in rows]
    assert per_chip == ([16, 32, 64, 128] if start_fits else [16, 8])


def _compile(config: str, *flags) -> dict:
  """The JSON line of `python -m ddae_jax.aot` for a v5e-4 (skips without libtpu)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[test]' on Linux x86_64)")
  import trainer_utils as tu
  cmd = [tu.sys.executable, "-m", "ddae_jax.aot", f"--config={tu.REPO}/{config}",
         "--topology=v5e-4", *flags]
  proc = tu.run(cmd, 1)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_tiny_step_compiles_for_a_v5e_slice():
  """The real TPU compiler on the tiny config: every field, and XLA's FLOPs near flops.py's."""
  row = _compile("configs/tiny.py")
  assert row["chip"] == "TPU v5 lite" and row["chips"] == row["devices"] == 4
  assert row["mesh"] == {"data": 4, "fsdp": 1} and row["per_chip_batch"] == 4
  # "auto" on TPUs: models/short_attention.py's kernels (1 + 16 and 1 + 64 tokens, heads
  # of 16 and 8), lowered by Mosaic, under shard_map over the 4 chips.
  assert row["attention_impl"] == "pallas_short" and row["fits"] is True
  assert row["mosaic_kernels"] > 0
  for key in ("argument_gb", "output_gb", "temp_gb", "total_gb", "hbm_gb",
              "gb_accessed_per_image", "flop_per_byte", "ridge_flop_per_byte",
              "roofline_step_ms", "roofline_images_per_s_per_chip", "compile_s"):
    assert row[key] > 0, key
  assert row["bound"] in ("compute", "memory") and row["jax"] and row["libtpu"]
  # No compiled step moves less than the fusion floor (flops.floor_bytes_per_image).
  assert row["gb_accessed_per_image"] >= row["floor_gb_per_image"] > 0
  # Width 64 makes layer norms, GELUs and the optimizer a fifth of the work;
  # at ViT-B the two agree within a few per cent (BENCHMARKS.md).
  assert 1.0 < row["compiled_over_analytic"] < 1.4, row
  # Data parallelism: the float32 gradients are all-reduced.
  assert row["collectives"]["all-reduce"]["bytes"] > 1e6


@pytest.mark.slow
def test_pallas_flash_attention_compiles_for_a_v5e_slice():
  """At 48 px the tiny config's momentum encoder and decoders see 1 + 144 tokens, so the
  flash kernel runs (under shard_map over the 4 chips); the encoder's 37 stay on XLA."""
  row = _compile("configs/tiny.py", "--config.model.attention_impl=pallas",
                 "--config.model.image_size=48")
  assert row["attention_impl"] == "pallas" and row["fits"] is True
  assert row["mosaic_kernels"] > 0


@pytest.mark.slow
def test_short_attention_cuts_a_decoder_blocks_bytes_at_its_flops():
  """One ViT-B pixel-decoder block (197 tokens, 16 heads of 32), fwd + bwd, on a v5e chip:
  the kernels declare their FLOPs (the backward's recomputed q k^T included: 14 T^2 d per
  head against XLA's 12), so the compiler's count stays within 2% of XLA's, and it counts
  far fewer bytes, the [heads, T, T] tensors never reaching HBM (BENCHMARKS.md)."""
  rows = {impl: _compile("configs/vitb.py", "--block=pixel_decoder", "--config.batch_size=16",
                         f"--config.model.attention_impl={impl}")
          for impl in ("xla", "pallas_short")}
  np.testing.assert_allclose(rows["pallas_short"]["gflop"], rows["xla"]["gflop"], rtol=0.02)
  assert rows["pallas_short"]["gb_accessed"] < 0.7 * rows["xla"]["gb_accessed"], rows


@pytest.mark.slow
def test_16_bit_logits_cut_the_bytes_of_a_decoder_block():
  """--block compiles one ViT-B pixel-decoder block (fwd + bwd) on a v5e chip: "xla"
  (bfloat16 logits, float32 softmax) moves fewer bytes than float32 logits, at the
  same FLOPs (BENCHMARKS.md)."""
  rows = {impl: _compile("configs/vitb.py", "--block=pixel_decoder", "--config.batch_size=16",
                         f"--config.model.attention_impl={impl}") for impl in ("xla", "")}
  assert rows["xla"]["tokens"] == 197 and rows["xla"]["batch"] == 4 * 4  # 4 per chip x K
  np.testing.assert_allclose(rows["xla"]["gflop"], rows[""]["gflop"], rtol=0.01)
  assert rows["xla"]["gb_accessed"] < 0.95 * rows[""]["gb_accessed"], rows


@pytest.mark.slow
def test_the_quickstart_evaluator_compiles_and_states_its_share():
  """--evaluator=knn: the quickstart's k-NN (1,497 bank digits, 300 queries, batches of
  at most 256 on 4 chips) and its share of the run by the roofline, the step's time given."""
  row = _compile("configs/quickstart.py", "--evaluator=knn", "--step_ms=2.0")
  parts = row["parts"]
  assert (row["bank_images"], row["query_images"], row["every_steps"]) == (1497, 300, 78)
  assert (parts["embed_bank"]["batches"], parts["embed_bank"]["batch"]) == (6, 252)
  assert (parts["embed_queries"]["batches"], parts["embed_queries"]["batch"]) == (2, 152)
  assert row["block_pooling"] == [4, "avg"] and row["roofline_step_ms"] == 2.0
  per_eval = sum(p["batches"] * p["roofline_ms"] for p in parts.values()) / 1e3
  assert row["roofline_s_per_evaluation"] == pytest.approx(per_eval, abs=2e-3)
  assert row["evaluator_fraction"] == pytest.approx(per_eval / (78 * 2e-3 + per_eval), rel=1e-2)
  assert parts["embed_bank"]["gflop_per_chip"] > 0 and "not measured" in row["estimate"]


@pytest.mark.slow
def test_fine_tuning_step_compiles_for_a_v5e_slice():
  row = _compile("configs/finetune_quickstart.py", "--binary=finetune")
  assert row["binary"] == "finetune" and row["fits"] is True and row["per_chip_batch"] == 16
  assert 1.0 < row["compiled_over_analytic"] < 1.4, row


def test_bytes_by_scope_counts_operands_and_results_by_module():
  hlo = """HloModule m

ENTRY %main (p: bf16[8,64]) -> f32[8] {
  %p = bf16[8,64]{1,0} parameter(0)
  %fusion.1 = bf16[8,256]{1,0} fusion(%p), kind=kOutput, calls=%f1, metadata={op_name="jit(train_step)/jvp(ViTEncoder)/block_3/mlp/fc1/dot_general"}
  %fusion.2 = f32[8]{0} fusion(%fusion.1, %p), kind=kLoop, calls=%f2, metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/block_1/attn/qkv/dot_general"}
  ROOT %copy = f32[8]{0} copy(%fusion.2)
}
"""  # noqa: E501 (HLO lines as XLA prints them)
  assert aot.bytes_by_scope(hlo) == {
      "backward Decoder/block/attn": 8 * 4 + 8 * 256 * 2 + 8 * 64 * 2,
      "forward ViTEncoder/block/mlp": 8 * 64 * 2 + 8 * 256 * 2,
      "other": 2 * 8 * 4}
