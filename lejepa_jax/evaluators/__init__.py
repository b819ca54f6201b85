"""Frozen evaluation: features, linear probe, k-NN."""
