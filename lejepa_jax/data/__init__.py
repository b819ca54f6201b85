"""Data: sources, augmentations and the Grain multi-crop pipeline."""
