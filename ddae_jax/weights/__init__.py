"""Every weights format: Orbax checkpoints, pretraining workdirs, timm/MAE and VQ-KD state dicts."""
