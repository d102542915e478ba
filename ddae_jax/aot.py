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

import json
import os

# Set before JAX starts (the library imports it). The compile-only TPU devices come from
# libtpu; the host's own backend (for the init key) stays the CPU, so an installed
# libtpu never probes for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock for the TPU it drives; compiling drives none,
# so compiles may run side by side (and beside a training run on a TPU VM).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags
from ml_collections import config_flags

from ddae_jax import cli
from ddae_jax.perf import aot, aot_evals

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretraining or fine-tuning config file.",
                                lock_config=False)
flags.DEFINE_string("topology", "v5e-4", "TPU slice: gcloud accelerator name or libtpu "
                    "topology (v5e:2x2).")
flags.DEFINE_enum("binary", "main", ["main", "finetune"],
                  "Which step: pretraining (ddae_jax.main) or fine-tuning (ddae_jax.finetune).")
flags.DEFINE_bool("sweep", False, "Double the per-chip batch until it no longer fits; "
                  "report the largest that does.")
flags.DEFINE_bool("breakdown", False, "Add gb_per_image_by_scope: where the bytes accessed go.")
flags.DEFINE_enum("block", None, ["encoder", "momentum_encoder", "pixel_decoder",
                                   "distill_decoder"],
                  "Compile one block of that part (fwd + bwd; the momentum encoder fwd) on one "
                  "chip instead of the step, at the config's per-chip batch (x K for decoders).")
flags.DEFINE_string("evaluator", None, "Compile the evaluator config.evals.<name> (its "
                    "feature forward and k-NN scorer) and report its share of the run's time.")
flags.DEFINE_float("step_ms", None, "With --evaluator: the step's roofline ms (else the step "
                   "is compiled too).")
flags.DEFINE_float("margin", 0.1, "Fraction of HBM to keep free for fits=true (the runtime, "
                   "fragmentation and the input pipeline's buffers need some).")


def main(argv):
  del argv
  config = FLAGS.config
  s = aot.parse_slice(FLAGS.topology)
  devices = aot.slice_devices(s)
  if FLAGS.block:
    print(json.dumps(aot.block_report(config, FLAGS.block, s, devices[0])), flush=True)
    return
  if FLAGS.evaluator:
    step_s = FLAGS.step_ms / 1e3 if FLAGS.step_ms else None
    row = aot_evals.evaluator_report(config, FLAGS.evaluator, devices,
                                     aot.CHIPS[s.generation].hbm_gbps, step_s)
    print(json.dumps({"topology": s.name, "batch": config.batch_size, **row,
                      **aot.versions()}), flush=True)
    return
  if not FLAGS.sweep:
    print(json.dumps(aot.try_report(config, FLAGS.binary, s, devices, FLAGS.margin,
                                    FLAGS.breakdown)), flush=True)
    return
  largest = None
  for row in aot.sweep(config, FLAGS.binary, s, devices, FLAGS.margin):
    print(json.dumps(row), flush=True)
    if row["fits"]:
      largest = max(largest or 0, row["per_chip_batch"])
  print(json.dumps({"topology": s.name, "largest_per_chip_batch_that_fits": largest}),
        flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli.exits_on_user_errors(main))
