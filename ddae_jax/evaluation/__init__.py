"""Evaluation protocols: fine-tuning, linear probing and k-NN (shared pieces)."""
