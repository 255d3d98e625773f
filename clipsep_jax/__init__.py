"""clipsep-jax: text-queried sound separation learned from unlabeled video, in JAX/Flax."""

__version__ = "0.1.0"
