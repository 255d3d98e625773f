"""Shared test helpers."""

import os
import sys
from pathlib import Path

import numpy as np

# Eight emulated CPU devices, so that mesh and sharding tests run on this machine; set before
# any test module imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# The PyTorch rendition of the reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the signal's scale."""
    actual = np.asarray(actual).astype(np.complex128)  # complex: compare both parts
    expected = np.asarray(expected).astype(np.complex128)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def tiny_hf_config(**overrides):
    """A small transformers CLIPConfig (2 + 2 layers, 64 px images, 40-dim embeddings)."""
    import transformers

    text = dict(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=40, **overrides
    )
