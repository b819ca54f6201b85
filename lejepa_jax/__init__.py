"""LeJEPA in JAX/Flax: self-supervised pretraining with SIGReg."""
__version__ = '0.1.0'
