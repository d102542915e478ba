"""Pretraining methods: DDAE (and the MAE rows) and BEiT-v2, behind one interface."""
