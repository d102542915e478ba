"""ddae-jax: Deep Dynamic AutoEncoder (DDAE) pretraining for ViTs in JAX/Flax."""

__version__ = "0.1.0"
