"""The Flax CLAP towers and audio front end against transformers' PyTorch ClapModel and
ClapFeatureExtractor: embeddings, log-mel features, gradients, loading, and full-size counts."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import relative_error
from safetensors.numpy import save_file
from transformers import ClapFeatureExtractor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clipsep_jax.encoders import encoder_class
from clipsep_jax.encoders.clap import (
    CLAP,
    FrontEnd,
    abstract_params,
    checkpoint_keys,
    log_mel,
    resample,
)
from clipsep_jax.encoders.clap_towers import HTSAT_BASE, HTSAT_TINY, ClapConfig
from clipsep_jax.errors import UserError

# Small towers: a 2-layer RoBERTa, and an HTSAT on a 64 x 64 folded spectrogram (16 mel bins,
# 4 time chunks) with two stages: 16 x 16 patches in shifted 8 x 8 windows, then 8 x 8 patches
# in one unshifted window (the case of HTSAT's last stage).
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=80)
TINY_AUDIO = dict(window_size=8, num_mel_bins=16, spec_size=64, patch_size=4, patch_stride=[4, 4],
                  patch_embeds_hidden_size=8, hidden_size=16, depths=[2, 2],
                  num_attention_heads=[1, 2], enable_fusion=False)
# One second at 48 kHz: 101 frames, stretched to the tower's 256.
TINY_EXTRACTOR = dict(feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=1,
                      fft_window_size=1024, frequency_min=50, frequency_max=14000,
                      truncation="rand_trunc", padding="repeatpad")
TEXTS = ["the sound of a cat", "hi", "the the sound the", "sss"]


def roberta_tokenizer():
    """A byte-level BPE RoBERTa tokenizer: the 256 byte symbols, a few merges, RoBERTa's
    special tokens (<s> 0, <pad> 1, </s> 2)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "s")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return transformers.RobertaTokenizer(vocab=vocab, merges=merges)


def save_tiny_clap(folder, seed=0, audio=None, extractor=None):
    """A random tiny transformers ClapModel, its tokenizer and feature extractor in ``folder``."""
    tokenizer = roberta_tokenizer()
    config = transformers.ClapConfig(
        text_config=dict(TINY_TEXT, vocab_size=len(tokenizer)),
        audio_config=dict(TINY_AUDIO, **(audio or {})), projection_dim=24)
    torch.manual_seed(seed)
    model = transformers.ClapModel(config).eval()
    # transformers' init leaves norms at 1/0, the bias tables at 0, the BatchNorm statistics at
    # 0/1 and both logit scales equal: perturb them so that a mix-up shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "relative_position_bias_table" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale_a.fill_(2.0)
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.normal_(-40.0, 5.0)
        bn.running_var.uniform_(50.0, 200.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ClapFeatureExtractor(**dict(TINY_EXTRACTOR, **(extractor or {}))).save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clap")
    model, tokenizer = save_tiny_clap(folder)
    extractor = ClapFeatureExtractor.from_pretrained(str(folder))
    return folder, model, tokenizer, extractor, CLAP.from_pretrained(str(folder), batch_size=8)


def noise(rng, *shape):
    return rng.normal(0.0, 0.1, shape).astype(np.float32)


def torch_audio_embedding(model, waveform, extractor):
    """transformers' audio tower fed by a PyTorch rendition of the extractor's repeatpad log-mel
    (torch.stft), for autograd: [B, S] (S <= max length) -> unit embeddings [B, D]."""
    length, target = waveform.shape[1], extractor.nb_max_samples
    x = waveform.repeat(1, target // length)
    x = torch.nn.functional.pad(x, (0, target - x.shape[1]))
    n_fft = extractor.fft_window_size
    spectrum = torch.stft(x, n_fft, hop_length=extractor.hop_length,
                          window=torch.hann_window(n_fft), center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum.real**2 + spectrum.imag**2  # [B, bins, frames]
    filters = torch.from_numpy(extractor.mel_filters_slaney).float()
    mel = torch.einsum("bkt,km->btm", power, filters)
    features = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))[:, None]
    return model.get_audio_features(input_features=features).pooler_output


def test_mel_filter_banks_match_the_feature_extractor():
    """Full size (64 bins, 50-14,000 Hz): Slaney for rand_trunc, HTK for fusion."""
    theirs = ClapFeatureExtractor(frequency_min=50, frequency_max=14000)
    for truncation, want in (("rand_trunc", theirs.mel_filters_slaney),
                             ("fusion", theirs.mel_filters)):
        got = FrontEnd(truncation=truncation).mel_filters()
        assert got.shape == (513, 64)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("padding,truncation,length", [
    ("repeatpad", "rand_trunc", 14400),  # three repeats, then zeros
    ("repeatpad", "rand_trunc", 30000),  # one repeat: zeros only
    ("repeat", "rand_trunc", 14400),
    ("pad", "rand_trunc", 14400),
    ("repeatpad", "rand_trunc", 48000),  # exactly the maximum
    ("repeatpad", "fusion", 20000),  # HTK filters; the extractor's 4 channels are equal
    ("repeatpad", "rand_trunc", 70000),  # longer: a random crop, reproduced by its offset
])
def test_front_end_matches_the_feature_extractor(padding, truncation, length):
    settings = dict(TINY_EXTRACTOR, padding=padding, truncation=truncation)
    theirs = ClapFeatureExtractor(**settings)
    ours = FrontEnd.from_dict(theirs.to_dict())
    waveform = noise(np.random.default_rng(length), length)
    offset = 0
    if length > ours.max_length:
        np.random.seed(length)
        offset = np.random.randint(0, length - ours.max_length + 1)
        assert offset > 0
        np.random.seed(length)
    want = theirs(waveform, sampling_rate=48000, return_tensors="np")["input_features"][0]
    got = np.asarray(jax.jit(log_mel, static_argnums=1)(waveform[None], ours, offset))[0]
    assert want.shape[0] == (4 if truncation == "fusion" else 1)
    assert got.shape == want.shape[1:] == (101, 16)
    np.testing.assert_allclose(got, want[0], rtol=0, atol=1e-4)  # dB


def test_embeddings_match_transformers(tiny_clap):
    _, model, tokenizer, extractor, ours = tiny_clap
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_text = model.get_text_features(**tokens).pooler_output.numpy()
        want_states = model.text_model(**tokens).last_hidden_state.numpy()
    np.testing.assert_allclose(np.linalg.norm(want_text, axis=-1), 1.0, rtol=1e-6)
    got_text = ours.encode_text(TEXTS)
    assert got_text.shape == (4, 24) and got_text.dtype == np.float32
    assert relative_error(got_text, want_text) <= 1e-4

    states, mask = ours.text_token_states(TEXTS)
    assert states.shape == (4, 77, 32) and mask.shape == (4, 77)
    length = want_states.shape[1]
    np.testing.assert_array_equal(mask[:, :length], tokens["attention_mask"].numpy())
    assert not mask[:, length:].any()
    keep = mask[:, :length, None]
    assert relative_error(states[:, :length] * keep, want_states * keep) <= 1e-4

    rng = np.random.default_rng(0)
    clips = noise(rng, 3, 14400)  # repeat-padded to the extractor's 1 s
    features = extractor(list(clips), sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        want_audio = model.get_audio_features(input_features=features["input_features"])
    got_audio = ours.encode_audio(clips, 48000)
    assert got_audio.shape == (3, 24) and got_audio.dtype == np.float32
    assert relative_error(got_audio, want_audio.pooler_output.numpy()) <= 1e-4
    np.testing.assert_array_equal(ours.encode_audio(list(clips), sample_rate=48000), got_audio)

    # Other rates go through our resampler first.
    clip16 = noise(rng, 2, 6000)
    upsampled = np.asarray(resample(clip16, 16000, 48000))
    assert upsampled.shape == (2, 18000)
    features = extractor(list(upsampled), sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        want16 = model.get_audio_features(input_features=features["input_features"])
    assert relative_error(ours.encode_audio(clip16, 16000), want16.pooler_output.numpy()) <= 1e-4

    assert ours.logit_scale_audio == pytest.approx(np.exp(2.0), rel=1e-6)
    assert ours.logit_scale_text == pytest.approx(1 / 0.07, rel=1e-6)


def test_audio_gradient_matches_torch_autograd(tiny_clap):
    """d <r, embedding(waveform)> / d waveform through the front end and the tower."""
    _, model, _, extractor, ours = tiny_clap
    rng = np.random.default_rng(1)
    waveform, direction = noise(rng, 2, 14400), rng.normal(size=(2, 24)).astype(np.float32)

    def functional(w):
        return jnp.sum(ours.audio_embedding(ours.params, w) * direction)

    got = np.asarray(jax.jit(jax.grad(functional))(jnp.asarray(waveform)))
    x = torch.from_numpy(waveform).requires_grad_()
    (torch_audio_embedding(model, x, extractor) * torch.from_numpy(direction)).sum().backward()
    want = x.grad.numpy()
    assert np.abs(want).max() > 0
    assert relative_error(got, want) <= 1e-3


def test_loads_pytorch_bin_like_safetensors(tiny_clap, tmp_path):
    folder, model, _, _, ours = tiny_clap
    # transformers 5 writes safetensors only: a PyTorch pickle as older checkpoints have it.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    assert (tmp_path / "pytorch_model.bin").exists()
    assert not (tmp_path / "model.safetensors").exists()
    from_bin = CLAP.from_pretrained(str(tmp_path))
    flat_bin = dict(jax.tree_util.tree_leaves_with_path(from_bin.params))
    flat_safe = dict(jax.tree_util.tree_leaves_with_path(ours.params))
    assert flat_bin.keys() == flat_safe.keys()
    for path, value in flat_safe.items():
        np.testing.assert_array_equal(flat_bin[path], value)
    assert from_bin.frontend == ours.frontend == FrontEnd.from_dict(TINY_EXTRACTOR)
    assert from_bin.embedding_dim == 24 and from_bin.sample_rate == 48000


def test_bad_checkpoints_are_refused(tiny_clap, tmp_path):
    folder, model, _, _, _ = tiny_clap
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    def checkpoint(name, tensors):
        path = tmp_path / name
        shutil.copytree(folder, path)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return str(path)

    extra = dict(state, **{"text_model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"unexpected \['text_model.extra.weight'\]"):
        CLAP.from_pretrained(checkpoint("extra", extra))
    missing = {k: v for k, v in state.items() if k != "audio_projection.linear2.bias"}
    with pytest.raises(UserError, match=r"missing \['audio_projection.linear2.bias'\]"):
        CLAP.from_pretrained(checkpoint("missing", missing))
    wrong = dict(state, **{"logit_scale_t": np.zeros(2, np.float32)})
    with pytest.raises(UserError, match="wrong shape.*logit_scale_t"):
        CLAP.from_pretrained(checkpoint("wrong", wrong))

    fused = tmp_path / "fused"
    transformers.ClapConfig(audio_config={"enable_fusion": True}).save_pretrained(fused)
    with pytest.raises(UserError, match="enable_fusion"):
        CLAP.from_pretrained(str(fused))
    bert = tmp_path / "bert"
    transformers.BertConfig().save_pretrained(bert)
    with pytest.raises(UserError, match="not a CLAP checkpoint"):
        CLAP.from_pretrained(str(bert))


@pytest.mark.parametrize("audio,ours", [
    ({}, HTSAT_TINY),  # laion/clap-htsat-unfused
    (dict(patch_embeds_hidden_size=128, hidden_size=1024, depths=[2, 2, 12, 2]),
     HTSAT_BASE),  # laion/larger_clap_music
])
def test_full_size_parameter_counts(audio, ours):
    """The Flax towers of full-size configs hold transformers' parameters and its BatchNorm
    statistics (which are buffers there), and nothing else."""
    hf_config = transformers.ClapConfig(audio_config=audio)
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        model = transformers.ClapModel(hf_config)
    config = ClapConfig.from_transformers(hf_config)
    assert config == ours
    shapes = abstract_params(config)
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    torch_count = sum(p.numel() for p in model.parameters())
    batch_norm = model.audio_model.audio_encoder.batch_norm
    assert count == torch_count + batch_norm.running_mean.numel() + batch_norm.running_var.numel()
    if not audio:
        assert torch_count == 153_492_890
    buffers = ("position_ids", "token_type_ids", "relative_position_index", "num_batches_tracked")
    want_keys = {k for k in model.state_dict() if k.split(".")[-1] not in buffers}
    assert set(checkpoint_keys(config)) == want_keys


def test_resample_is_band_limited_and_differentiable():
    t16, t48 = np.arange(1600) / 16000, np.arange(4800) / 48000
    tone = np.sin(2 * np.pi * 1000 * t16).astype(np.float32)
    up = np.asarray(resample(tone[None], 16000, 48000))[0]
    assert up.shape == (4800,)
    inner = slice(300, -300)  # away from the zeros outside the clip
    np.testing.assert_allclose(up[inner], np.sin(2 * np.pi * 1000 * t48)[inner], atol=2e-4)
    down = np.asarray(resample(up, 48000, 16000))
    np.testing.assert_allclose(down[100:-100], tone[100:-100], atol=2e-4)
    # 20 kHz is above 16 kHz's Nyquist frequency: removed, not folded to 4 kHz.
    high = np.sin(2 * np.pi * 20000 * t48).astype(np.float32)
    assert np.abs(np.asarray(resample(high, 48000, 16000))[100:-100]).max() < 1e-3
    shape = lambda x, *rates: jax.eval_shape(lambda: resample(x, *rates)).shape
    assert shape(np.zeros((2, 3, 441)), 44100, 48000) == (2, 3, 480)
    assert shape(np.zeros(1001), 16000, 48000) == (3003,)
    assert shape(np.zeros(1001), 48000, 16000) == (334,)
    grad = jax.grad(lambda x: jnp.sum(resample(x, 16000, 48000) ** 2))(jnp.asarray(tone))
    np.testing.assert_allclose(np.asarray(grad)[inner], 6 * tone[inner], atol=2e-3)


def test_registered_and_bad_inputs_are_refused(tiny_clap):
    _, _, _, _, ours = tiny_clap
    assert encoder_class("clap") is CLAP
    with pytest.raises(TypeError, match="list of strings"):
        ours.encode_text("a cat")
    with pytest.raises(ValueError, match="non-empty"):
        ours.encode_text(["a cat", " "])
    assert ours.encode_text([]).shape == (0, 24)
    with pytest.raises(UserError, match="sample_rate"):
        ours.encode_audio(np.zeros((1, 100), np.float32), 0)
    with pytest.raises(UserError, match=r"\[B, samples\]"):
        ours.encode_audio(np.zeros(100, np.float32), 48000)
    with pytest.raises(UserError, match="NaN"):
        ours.encode_audio([np.full(100, np.nan, np.float32)], 48000)
    with pytest.raises(UserError, match="non-empty"):
        ours.encode_audio([np.zeros(0, np.float32)], 48000)
    with pytest.raises(ValueError, match="text and audio only"):
        ours.encode_image([np.zeros((8, 8, 3), np.uint8)])
