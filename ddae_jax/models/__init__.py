"""Flax modules: the ViT encoder and the MAE-style decoders."""
