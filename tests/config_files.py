"""The config files in configs/ and their variants, for the tests that load every one."""

import glob
import os
import runpy

from repo_paths import REPO

from ddae_jax import config_lib

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load(path, arg=""):
  return runpy.run_path(path)["get_config"](arg)


def config_variants():
  """(path, variant, the module's namespace, a test id) for every config file and each of its
  variants: the module's own `VARIANTS`, else the pretraining ones ("" is the config as is)."""
  for path in CONFIGS:
    module = runpy.run_path(path)
    for variant in ("", *module.get("VARIANTS", config_lib.VARIANTS)):
      name = os.path.basename(path)
      yield path, variant, module, f"{name}:{variant}" if variant else name
