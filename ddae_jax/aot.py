r"""Compiles the real train step for a TPU slice on any machine; one JSON line per compile.

  pip install -e '.[tpu]'   # libtpu: the TPU compiler, usable without a TPU
  python -m ddae_jax.aot --config=configs/vitb.py --topology=v4-64
  python -m ddae_jax.aot --config=configs/vitl.py --topology=v4-128 --sweep
  python -m ddae_jax.aot --config=configs/finetune_vitb.py --binary=finetune --topology=v5e-64
  python -m ddae_jax.aot --config=configs/vitb.py --topology=v5e-64 --block=pixel_decoder
  python -m ddae_jax.aot --config=configs/vitb.py --topology=v5e-4 --evaluator=knn

libtpu's compile-only devices stand in for the slice (jax.experimental.
topologies), so `jax.jit(step).lower(abstract state, abstract batch).compile()`
runs the TPU compiler ahead of time with the run's own mesh, sharding rules
and batch, as MaxText's train_compile.py checks a model against a pod before
renting it. Nothing is allocated: the state is ShapeDtypeStructs.

The line reports, per chip: the compiled step's arguments, outputs and
temporaries against the chip's HBM and whether they fit with --margin to
spare; the compiler's FLOPs and bytes accessed per image (its cost model, not
a measurement) against flops.py's analytic count; FLOP/byte against the chip's
ridge point (peak FLOP/s / HBM bandwidth); the roofline lower bound on the
step time, max(FLOPs / peak, bytes / bandwidth), and the upper bound on
images/s/chip it implies; the collectives in the optimised HLO; the fusion
floor (flops.floor_bytes_per_image) that no step of unfused products moves
less than. `--sweep` doubles the per-chip batch until the step no longer fits;
`--block=pixel_decoder` (encoder, momentum_encoder, distill_decoder) compiles
one block of that part on one chip instead, in seconds rather than minutes,
to try a change to the block before compiling the step. `--evaluator=knn`
compiles the evaluator config.evals.knn for the slice and reports the share
of the run's time it takes by the same roofline (ddae_jax/perf/aot_evals.py).

--topology takes gcloud accelerator names (v4-8 ... v4-4096 count cores, two
per chip; v5litepod-N alias v5e-N, v5p-N (cores), v6e-N count chips) or a
libtpu topology name such as v5e:2x2 or v4:2x2x1.
The library: ddae_jax/perf/aot.py.
"""

from absl import app, flags

from ddae_jax import cli
from ddae_jax.perf import aot

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli.exits_on_user_errors(aot.main))
