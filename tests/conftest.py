"""Test setup: 8 fake CPU devices, so sharded code runs on a mesh without accelerators."""

import os
import sys

# Must happen before JAX starts its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
