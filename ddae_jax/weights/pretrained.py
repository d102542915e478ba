"""Encoders out of pretraining runs: what evaluation, analysis and export restore.

A pretraining workdir holds `checkpoints/<step>/state` (the whole train state:
`params/encoder` is the online encoder theta, `ema_params` the momentum
encoder theta') and `config.json` (the run's config). `convert import` writes
the same layout with only the encoder, so every consumer reads both the same
way. Checkpoints restore onto the host CPU: the caller places the encoder on
its own mesh, and a pretraining run's optimizer state never touches an
accelerator.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from etils import epath

from ddae_jax.weights import checkpoints
from ddae_jax.weights.checkpoints import CheckpointMissing
from ddae_jax.weights.shapes import check_shapes, shapes_of

ENCODERS = ("online", "ema")


class CheckpointMismatch(ValueError):
  """A checkpoint's encoder differs from the one the config builds."""


def checkpoint_dir(workdir) -> epath.Path:
  """`workdir/checkpoints` when present, else `workdir` itself (a bare checkpoint dir)."""
  workdir = epath.Path(workdir)
  return workdir / "checkpoints" if (workdir / "checkpoints").exists() else workdir


def load_config(workdir) -> ml_collections.ConfigDict | None:
  """The config a run saved in `workdir/config.json`, or None if it has none."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def save_config(workdir, config) -> None:
  """Writes `config` to `workdir/config.json` (process 0 only; readable by load_config)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def restore_state(workdir, step: int | None = None) -> tuple[dict, int]:
  """(the whole saved state as host NumPy arrays, its step).

  Args:
    workdir: a pretraining workdir or a checkpoint directory.
    step: which checkpoint; None = the latest.
  """
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    raise CheckpointMissing(f"no checkpoint directory: {workdir} does not exist")
  manager = checkpoints.open_manager(directory, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise CheckpointMissing(
        f"no checkpoint {'at step ' + str(step) if step is not None else ''} in {directory}"
        f" (found steps {sorted(manager.all_steps())})")
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  try:
    with checkpoints.no_io_outlives_a_failed_read():
      metadata = manager.item_metadata(step)[checkpoints.STATE]
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                              metadata)
      state = manager.restore(step, args=checkpoints.restore_args(abstract, data=False))
  finally:
    manager.close()
  state = state[checkpoints.STATE]
  return jax.tree.map(np.asarray, dict(state)), step


def encoder_from_state(state: dict, which: str = "ema") -> dict:
  """The online ("online") or momentum ("ema") encoder parameters of a train state."""
  if which not in ENCODERS:
    raise ValueError(f"encoder={which!r} is invalid: allowed {ENCODERS}")
  if which == "ema":
    if "ema_params" not in state:
      raise CheckpointMismatch(
          "encoder='ema' but this checkpoint has no momentum encoder (the run had "
          "distillation off); use encoder='online'")
    return state["ema_params"]
  return state["params"]["encoder"]


def describe(encoder_params: dict) -> dict:
  """{width, depth, patch_size, num_patches (or None)} read off encoder parameter shapes."""
  kernel = np.shape(encoder_params["patch_embed"]["kernel"])
  depth = sum(1 for k in encoder_params if k.startswith("block_"))
  pos = encoder_params.get("pos_embed")
  return {"width": kernel[1], "depth": depth, "patch_size": int(round((kernel[0] / 3) ** 0.5)),
          "num_patches": None if pos is None else np.shape(pos)[1] - 1}


def check_encoder(found: dict, expected: dict, ignore: tuple[str, ...] = (),
                  what: str = "checkpoint") -> None:
  """Raises CheckpointMismatch listing every missing, unexpected or misshapen parameter.

  Args:
    found: the parameters read from the checkpoint (arrays or ShapeDtypeStructs).
    expected: the parameters the config's model builds (same).
    ignore: top-level names that may differ (e.g. "pos_embed", resized elsewhere).
  """
  kept = lambda tree: {k: v for k, v in shapes_of(tree).items()
                       if k.split("/")[0] not in ignore}
  fd, ed = describe(found), describe(expected)
  check_shapes(
      kept(found), kept(expected), CheckpointMismatch,
      f"the {what} holds a ViT of width {fd['width']}, depth {fd['depth']}, patch "
      f"{fd['patch_size']}; the config expects width {ed['width']}, depth {ed['depth']}, "
      f"patch {ed['patch_size']}", missing=f"missing from the {what}",
      unexpected=f"unexpected in the {what}")


def load_encoder(workdir, which: str = "ema", step: int | None = None) -> tuple[dict, int]:
  """(encoder parameters as host NumPy arrays, step) from a pretraining or imported run."""
  state, step = restore_state(workdir, step)
  return encoder_from_state(state, which), step


def save_encoder(workdir, encoder_params: dict, config=None, step: int = 0) -> None:
  """Writes an encoder-only checkpoint in the pretraining layout (`convert import`).

  The same parameters go in as the online and the momentum encoder, so
  `load_encoder(..., which=...)` works with either choice.
  """
  workdir = epath.Path(workdir)
  params = jax.tree.map(np.asarray, encoder_params)
  state = {"step": np.asarray(step, np.int32), "params": {"encoder": params},
           "ema_params": params}
  manager = checkpoints.open_manager(workdir / "checkpoints", create=True)
  manager.save(step, args=checkpoints.save_args(state, positions=[0]), force=True)
  manager.wait_until_finished()
  manager.close()
  if config is not None:
    save_config(workdir, config)
