"""Masking, the distance map and dynamic weights (eq. 2), and the DDAE losses (eq. 3, 5, 6)."""
