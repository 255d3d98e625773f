"""The CLAP family: its config checks, the contrastive loss against a brute-force rendition, and a
CLAP trained through the generic loop loaded back as a frozen CLAP."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipsep_jax import checkpoints, train
from clipsep_jax.config import default_config, validate
from clipsep_jax.encoders.clap import log_mel, resample
from clipsep_jax.encoders.clap_towers import ClapModel
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.clap import evaluation, load_trained_clap, save_trained_clap
from clipsep_jax.families.clap.model import (
    batch_statistics,
    clap_config,
    contrastive_loss,
    front_end,
    update_statistics,
)
from clipsep_jax.families.clap.tokenizer import byte_tokenizer, text_length, tokenize
from clipsep_jax.families.clap.trained import clap_from_variables
from clipsep_jax.input_pipeline import open_split


def tiny_clap(data_dir=""):
    """A CLAP small enough for the tests, reading 8 kHz (the dataset's 16 kHz resampled). Its
    parameters come in few shapes: saving a checkpoint compiles a slice per shape."""
    config = default_config("clap")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    m = config.model
    m.text_hidden_size, m.text_layers, m.text_heads = 16, 1, 2
    m.text_intermediate_size, m.text_max_positions = 64, 40
    m.sample_rate, m.num_mel_bins, m.fft_window_size, m.hop_length = 8000, 16, 256, 128
    m.clip_samples, m.frequency_max = 4096, 4000.0  # 33 frames, stretched to 64
    m.spec_size, m.patch_size, m.window_size = 32, 4, 4
    m.audio_embed_dim, m.audio_depths, m.audio_heads = 16, (1,), (2,)
    m.projection_dim = 16
    config.clap.templates = ("The sound of {label}", "{label} playing")
    t = config.train
    t.batch_size = 8  # the tests run on 8 emulated devices
    t.num_steps, t.checkpoint_every_steps, t.validation_every_steps = 3, 3, 3
    t.learning_rate, t.lr_warmup_steps, t.lr_decay_end_step = 3e-3, 1, 3
    t.log_every_steps = 1
    config.mesh.fsdp_min_size = 1 << 30
    return config


@pytest.mark.parametrize("field, value, message", [
    ("model.spec_size", 40, "config.model.spec_size=40 is not a multiple"),
    ("model.clip_samples", 16384, "config.model.clip_samples=16384: 129 frames"),
    ("model.window_size", 16, "config.model.window_size=16: wider than"),
    ("model.text_vocab_size", 100, "config.model.text_vocab_size=100"),
    ("model.text_heads", 3, "config.model.text_hidden_size=16 is not divisible"),
    ("model.frequency_max", 5000.0, "frequency_max=5000.0"),
    ("model.audio_heads", (2, 2), "config.model.audio_depths=.* and audio_heads"),
    ("model.audio_heads", (3,), r"audio_heads\[0\]=3: need >= 1 each, and heads dividing"),
    ("clap.duplicates", "drop", "config.clap.duplicates='drop'"),
    ("clap.templates", ("The sound of {}",), "config.clap.templates: 'The sound of {}'"),
    ("clap.eval.template", "a {label", "config.clap.eval.template"),
])
def test_config_errors_name_the_field(field, value, message):
    config = tiny_clap()
    validate(config)
    section, name = field.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(UserError, match=message):
        validate(config)


def brute_force_loss(audio, text, labels, scale_audio, scale_text, duplicates):
    """CLAP's symmetric InfoNCE in loops: each clip's cross-entropy against its positives'
    captions (all captions of its label, or its own), and each caption's against the clips ->
    (audio-to-text, text-to-audio)."""
    audio, text = np.asarray(audio, np.float64), np.asarray(text, np.float64)
    n = len(labels)

    def direction(queries, keys, scale):
        total = 0.0
        for i in range(n):
            logits = [scale * float(queries[i] @ keys[j]) for j in range(n)]
            log_norm = np.log(sum(np.exp(x) for x in logits))
            positives = ([j for j in range(n) if labels[j] == labels[i]]
                         if duplicates == "positives" else [i])
            total -= sum(logits[j] - log_norm for j in positives) / len(positives)
        return total / n

    return direction(audio, text, scale_audio), direction(text, audio, scale_text)


def test_the_loss_equals_a_brute_force_rendition():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    audio, text = unit(rng.normal(size=(6, 5))), unit(rng.normal(size=(6, 5)))
    labels = np.array([0, 1, 0, 2, 1, 0])
    for duplicates in ("positives", "ignore"):
        loss, metrics = contrastive_loss(jnp.asarray(audio, jnp.float32),
                                         jnp.asarray(text, jnp.float32), jnp.asarray(labels),
                                         jnp.float32(14.0), jnp.float32(9.0), duplicates)
        audio_to_text, text_to_audio = brute_force_loss(audio, text, labels, 14.0, 9.0,
                                                        duplicates)
        np.testing.assert_allclose(float(loss), (audio_to_text + text_to_audio) / 2, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["audio_to_text"]), audio_to_text, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["text_to_audio"]), text_to_audio, rtol=1e-5)
    # without duplicates the multi-positive target is plain InfoNCE's
    distinct = np.arange(6)
    a, b = (float(contrastive_loss(jnp.asarray(audio, jnp.float32),
                                   jnp.asarray(text, jnp.float32), jnp.asarray(distinct),
                                   jnp.float32(14.0), jnp.float32(9.0), d)[0])
            for d in ("positives", "ignore"))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_batch_norm_statistics_follow_pytorch():
    mel = np.random.default_rng(1).normal(-40.0, 12.0, (3, 7, 5)).astype(np.float32)
    mean, var = batch_statistics(jnp.asarray(mel))
    np.testing.assert_allclose(mean, mel.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(var, mel.var(axis=(0, 1)), rtol=1e-4)
    running = {"mean": np.full(5, 2.0, np.float32), "var": np.full(5, 3.0, np.float32)}
    moved = update_statistics(running, mean, var, 21, 0.1)
    np.testing.assert_allclose(moved["mean"], 1.8 + 0.1 * mel.mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(moved["var"], 2.7 + 0.1 * mel.var(axis=(0, 1), ddof=1),
                               rtol=1e-4)


def test_trained_clap_loads_as_a_frozen_clap(generated_dataset, tmp_path):
    config = tiny_clap(generated_dataset)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    saved, variables, _ = checkpoints.load_workdir(workdir, "best")
    stats = variables["batch_stats"]
    assert not np.allclose(stats["mean"], 0.0)  # the running statistics moved

    clap = load_trained_clap(workdir)
    assert clap.sample_rate == 8000
    np.testing.assert_allclose(clap.logit_scale_audio,
                               np.exp(float(variables["params"]["logit_scale_a"])), rtol=1e-6)
    np.testing.assert_allclose(clap.logit_scale_text,
                               np.exp(float(variables["params"]["logit_scale_t"])), rtol=1e-6)
    texts = ["The sound of tuba", "accordion playing", "a cat"]
    source, _ = open_split(saved.data, "test")
    waves = np.stack([np.asarray(source[i]["waveform"][:8192], np.float32) for i in range(3)])

    # The towers applied directly, with the checkpoint's BatchNorm statistics put back by hand.
    params = dict(variables["params"])
    params["audio_encoder"] = dict(params["audio_encoder"])
    params["audio_encoder"]["batch_norm"] = {**params["audio_encoder"]["batch_norm"], **stats}
    model = ClapModel(clap_config(saved))
    ids, mask = tokenize(byte_tokenizer(), texts, text_length(saved.model.text_max_positions))

    @jax.jit
    def direct(params, ids, mask, waves):
        variables = {"params": params}
        features = log_mel(resample(waves, 16000, 8000), front_end(saved))
        return (model.apply(variables, ids, mask, method=ClapModel.encode_text),
                model.apply(variables, ids, mask, method=ClapModel.text_states)[0],
                model.apply(variables, features, method=ClapModel.encode_audio))

    text, states, audio = direct(params, ids, mask, waves)
    np.testing.assert_allclose(clap.encode_text(texts), text, atol=2e-6)
    clap_states, clap_mask = clap.text_token_states(texts)
    np.testing.assert_allclose(clap_states, states, atol=2e-5)
    np.testing.assert_array_equal(clap_mask, mask)
    np.testing.assert_allclose(clap.encode_audio(waves, sample_rate=16000), audio, atol=2e-6)

    report = evaluation.zero_shot(saved, clap, progress=False)
    assert report["clips"] == len(source) and set(report) >= {"top1", "top3"}
    assert "| test | 4 | 2 |" in evaluation.format_zero_shot(report)

    folder = save_trained_clap(workdir, tmp_path / "model")
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    # A weaksep model packaged with this run as its CLAP carries the same model directory.
    weak = default_config("weaksep")
    weak.weaksep.clap, weak.weaksep.clap_step = str(workdir), "best"
    carried = get_family(weak).save_companion(weak, "weaksep.clap", Path(workdir),
                                              tmp_path / "carried")
    assert sorted(p.name for p in carried.iterdir()) == sorted(p.name for p in folder.iterdir())
    again = load_trained_clap(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, clap.params)
    assert again.params["logit_scale_a"].shape == ()
    assert again.tokenize(texts)[0].tolist() == ids.tolist()
    with pytest.raises(UserError, match="not a CLAP"):
        clap_from_variables(default_config("clipsonic"), variables)
