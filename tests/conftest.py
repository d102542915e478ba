"""Test setup: 8 fake CPU devices, so sharded code runs on a mesh without accelerators."""

import functools
import os
import sys

import pytest

# Must happen before JAX starts its backend. The tests are bound by XLA's CPU
# compile time, not by run time: skip LLVM's expensive optimisations.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from repo_paths import REPO  # noqa: E402

if REPO not in sys.path:
  sys.path.insert(0, REPO)


@pytest.fixture
def interpreted_kernels(monkeypatch):
  """Runs the Pallas TPU kernels (models/attention.py's flash path, models/short_attention.py)
  with Pallas's interpreter on the CPU."""
  from jax.experimental import pallas as pl
  monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, interpret=True))
