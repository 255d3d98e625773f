"""The audio front end against librosa (STFT) and PyTorch's grid_sample (log-frequency warp)."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch_reference import reference_grid

from clipsep_jax import audio


@pytest.mark.parametrize("num_samples", [65535, 16000, 4097, 30001])
def test_stft_and_istft_match_librosa(num_samples):
    rng = np.random.default_rng(num_samples)
    wave = rng.uniform(-1, 1, num_samples).astype(np.float32)
    expected = librosa.stft(
        wave, n_fft=1024, hop_length=256, win_length=1024, center=True, pad_mode="reflect"
    )
    spectrum = jax.jit(audio.stft)(wave)
    assert spectrum.shape == expected.shape == (513, 1 + num_samples // 256)
    assert relative_error(spectrum, expected) <= 1e-4

    for length in (None, num_samples):
        expected_wave = librosa.istft(expected, hop_length=256, win_length=1024, length=length)
        wave_back = audio.istft(jnp.asarray(expected), hop_length=256, win_length=1024,
                                length=length)
        assert wave_back.shape == expected_wave.shape
        assert relative_error(wave_back, expected_wave) <= 1e-4


def test_stft_is_batched_and_round_trips():
    rng = np.random.default_rng(1)
    waves = rng.uniform(-1, 1, (3, 2, 20000)).astype(np.float32)
    spectra = audio.stft(waves)
    assert spectra.shape == (3, 2, 513, 79)
    for index in np.ndindex(3, 2):
        single = audio.stft(waves[index])
        assert relative_error(spectra[index], single) <= 1e-6
    back = audio.istft(spectra, length=20000)
    # Centred STFT with a Hann window at 75% overlap reconstructs the signal exactly.
    assert relative_error(back, waves) <= 1e-5


def test_hop_that_does_not_divide_n_fft_uses_the_general_path():
    rng = np.random.default_rng(2)
    wave = rng.uniform(-1, 1, 8000).astype(np.float32)
    expected = librosa.stft(wave, n_fft=512, hop_length=160, win_length=400, pad_mode="reflect")
    got = audio.stft(wave, n_fft=512, hop_length=160, win_length=400)
    assert relative_error(got, expected) <= 1e-4
    expected_wave = librosa.istft(expected, hop_length=160, win_length=400, n_fft=512)
    assert relative_error(audio.istft(jnp.asarray(expected), hop_length=160, win_length=400),
                          expected_wave) <= 1e-4


def test_istft_pads_to_a_longer_length_like_librosa():
    spectrum = librosa.stft(np.random.default_rng(3).uniform(-1, 1, 5000).astype(np.float32))
    expected = librosa.istft(spectrum, hop_length=512, length=9000)
    got = audio.istft(jnp.asarray(spectrum), hop_length=512, win_length=2048, length=9000)
    assert got.shape == (9000,)
    assert relative_error(got, expected) <= 1e-4


def test_stft_refuses_signals_too_short_to_pad():
    with pytest.raises(ValueError, match="too short"):
        audio.stft(np.zeros(100, np.float32))


def test_magnitude_phase_round_trip():
    spectrum = audio.stft(np.random.default_rng(4).uniform(-1, 1, 4096).astype(np.float32))
    magnitude, phase = audio.magnitude_phase(spectrum)
    assert relative_error(audio.from_magnitude_phase(magnitude, phase), spectrum) <= 1e-6


@pytest.mark.parametrize("num_frames", [256, 64, 1001])
def test_warp_and_unwarp_match_grid_sample(num_frames):
    rng = np.random.default_rng(num_frames)
    magnitude = rng.gamma(0.5, 1.0, (2, 513, num_frames)).astype(np.float32)
    expected = F.grid_sample(
        torch.from_numpy(magnitude)[:, None],
        reference_grid(2, 256, num_frames, warp=True),
        align_corners=True,
    )[:, 0].numpy()
    warped = jax.jit(audio.warp_to_log_frequency)(magnitude)
    assert warped.shape == (2, 256, num_frames)
    assert relative_error(warped, expected) <= 1e-5

    mask = rng.uniform(0, 1, (2, 256, num_frames)).astype(np.float32)
    expected = F.grid_sample(
        torch.from_numpy(mask)[:, None],
        reference_grid(2, 513, num_frames, warp=False),
        align_corners=True,
    )[:, 0].numpy()
    unwarped = audio.unwarp_to_linear_frequency(mask, 513)
    assert unwarped.shape == (2, 513, num_frames)
    assert relative_error(unwarped, expected) <= 1e-5


def test_warp_matrix_rows_are_interpolation_weights():
    matrix = audio.bilinear_resample_matrix(513, 256, to_log=True)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    assert (matrix >= 0).all() and ((matrix > 0).sum(axis=1) <= 2).all()
    # Log-frequency: the low bins are sampled densely, the high bins sparsely.
    first_source = (matrix > 0).argmax(axis=1)
    assert first_source[1] - first_source[0] <= 1 and first_source[-1] - first_source[-2] >= 5
