"""What several test files share: config files loaded by name (each one and its variants,
the tiny one), images a tiny model learns, small checkpoints of a stand-in state."""

import glob
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
from repo_paths import REPO, repo_path

from ddae_jax import config_lib, runtime
from ddae_jax.weights import checkpoints

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


# ------------------------------------------------------------- config files
def config_module(path: str) -> dict:
  """The namespace of a config file (absolute or repository-relative): get_config, VARIANTS."""
  return runpy.run_path(repo_path(path))


def load(path: str, arg: str = ""):
  """A config file's get_config(arg); `path` absolute or repository-relative, and may carry
  the variants as on the command line: load("configs/vitb.py:smoke")."""
  path, _, variants = path.partition(":")
  assert not (arg and variants), (path, arg, variants)
  return config_module(path)["get_config"](arg or variants)


def tiny(arg: str = "", epochs: float | None = None):
  """configs/tiny.py's config (with `arg`'s variants), for `epochs` where given."""
  config = load("configs/tiny.py", arg)
  if epochs is not None:
    config.epochs = epochs
  return config


def config_variants():
  """(path, variant, the module's namespace, a test id) for every config file and each of its
  variants: the module's own `VARIANTS`, else the pretraining ones ("" is the config as is)."""
  for path in CONFIGS:
    module = config_module(path)
    for variant in ("", *module.get("VARIANTS", config_lib.VARIANTS)):
      name = os.path.basename(path)
      yield path, variant, module, f"{name}:{variant}" if variant else name


# ------------------------------------------------------------- images
def smooth_images(n, size=32, seed=0):
  """Low-frequency colour images: learnable in a few hundred steps, unlike noise."""
  small = np.random.RandomState(seed).rand(n, 4, 4, 3)
  big = jax.image.resize(small, (n, size, size, 3), "bicubic")
  return (np.asarray(big).clip(0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------- checkpoints
def small_state(width=4):
  """A stand-in train state: a step, one parameter array of [width, 3], an optimizer's."""
  return {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones((width, 3))},
          "opt_state": (jnp.zeros((width, 3)),)}


def abstract(state):
  """`state`'s shapes on this process's first device, as a restore asks for them."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return runtime.with_shardings(jax.eval_shape(lambda: state),
                                jax.tree.map(lambda _: sharding, state))


def save_steps(directory, steps, width=4):
  """Checkpoints of small_state(width) + s at each step s, input position 10 * s."""
  ckpt = checkpoints.Checkpointer(directory, 1, 10, use_async=False)
  for s in steps:
    state = jax.tree.map(lambda x, s=s: x + s, small_state(width))
    ckpt.save(s, dict(state, step=jnp.asarray(s, jnp.int32)), data_position=10 * s, force=True)
  ckpt.close()


def truncate_array_files(step_dir):
  """Halves each of the step's array data files (OCDBT's `d/` folders)."""
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files if os.path.basename(d) == "d" else ():
      path = os.path.join(d, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
