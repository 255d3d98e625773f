"""Shared test helpers."""

import sys
from pathlib import Path

import numpy as np

# The PyTorch rendition of the reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the signal's scale."""
    actual = np.asarray(actual).astype(np.complex128)  # complex: compare both parts
    expected = np.asarray(expected).astype(np.complex128)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
