"""cc2dv2_jax: one-shot anatomical landmark detection (CC2Dv2) in JAX/Flax."""

__version__ = "0.1.0"
