"""The numbers behind the paper's figures, computed from runs (see `ddae_jax.analyze`)."""
