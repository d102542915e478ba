"""The device mesh and how the train state and batches are laid out on it.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data
parallelism whose parameters and optimizer state are also split, ZeRO-3
style). A batch is split over both. Parameters follow regex rules on their
path in the state tree (e.g. "params/encoder/block_3/mlp/fc1/kernel" or the
same path under "opt_state"), first match wins:
  "replicate": a full copy on every device;
  "fsdp": the largest dimension divisible by the fsdp axis is split over it.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: all), -1 taking what remains."""
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(mesh_config)
  fixed = int(np.prod([s for s in axes.values() if s != -1]))
  shape = [len(devices) // fixed if axes[a] == -1 else axes[a] for a in BATCH_AXES]
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"config.sharding.mesh {tuple(mesh_config)} gives shape {shape}, "
                     f"which does not cover the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES)


def path_str(path) -> str:
  """'a/b/c' for a jax tree path: dict keys, attribute names (optax's named-tuple states), indices.

  E.g. "params/encoder/block_3/mlp/fc1/kernel" or "opt_state/inner_states/decay/
  inner_state/0/mu/...": what sharding rules, weight-decay masks and checkpoint
  comparisons match.
  """
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _fsdp_spec(shape, fsdp_size: int) -> P:
  if fsdp_size == 1:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, rules):
  """NamedSharding for every leaf of a (shape-only) state tree, by the rules."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    shape = getattr(leaf, "shape", ())
    for pattern, spec in compiled:
      if pattern.search(name):
        if spec == "fsdp" and len(shape) > 0:
          return NamedSharding(mesh, _fsdp_spec(shape, mesh.shape["fsdp"]))
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
