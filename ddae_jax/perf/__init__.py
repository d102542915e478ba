"""Measuring the step: analytic FLOPs, TPU compiler reports, step and input timings."""
