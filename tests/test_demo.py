"""The embedded demo end to end, reduced: prepare synth_music, train a few steps, evaluate,
write example separations, then separate one of them with the separation command."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import synth_music

REPO = Path(__file__).resolve().parents[1]


def test_synth_music_is_deterministic_and_sounds_like_its_instrument(tmp_path):
    first = synth_music.render_melody("tuba", np.random.default_rng([0, 1]), 3.0)
    again = synth_music.render_melody("tuba", np.random.default_rng([0, 1]), 3.0)
    flute = synth_music.render_melody("flute", np.random.default_rng([0, 1]), 3.0)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (48000,) and 0.39 < np.abs(first).max() <= 0.9

    def median_frequency(wave):  # Hz below which half the energy lies
        power = np.abs(np.fft.rfft(wave)) ** 2
        return np.searchsorted(np.cumsum(power) / power.sum(), 0.5) / 3.0

    assert median_frequency(first) < 600 < 1000 < median_frequency(flute)  # tuba low, flute high
    frames = synth_music.scene_frames("violin", np.random.default_rng(0), 4)
    other = synth_music.scene_frames("cello", np.random.default_rng(0), 4)
    assert frames.shape == (4, 96, 96, 3) and frames.dtype == np.uint8
    colour = lambda f: f.astype(float).mean((0, 1, 2))  # noqa: E731
    assert np.abs(colour(frames) - colour(other)).max() > 20
    tree = synth_music.write_tree(tmp_path / "tree", (1, 1, 1, 1), seconds=3.0,
                                  labels=("tuba", "flute"))
    rows = (tree / "train.csv").read_text().splitlines()
    assert rows == ["audio/tuba/train_tuba_000.wav,frames/tuba/train_tuba_000,3,tuba",
                    "audio/flute/train_flute_000.wav,frames/flute/train_flute_000,3,flute"]
    assert (tree / "held_out.csv").read_text().splitlines()[0] == (
        "audio/tuba/held_out_tuba_000.wav,frames/tuba/held_out_tuba_000,3,tuba")
    fonts = {row[0]: row[1] for row in
             (line.split(",") for line in (tree / "renderings.csv").read_text().splitlines())}
    assert fonts["audio/tuba/held_out_tuba_000.wav"] == "FluidR3_GM"
    assert {fonts[f"audio/{slug}/{split}_{slug}_000.wav"] for split in ("train", "val", "test")
            for slug in ("tuba", "flute")} <= set(synth_music.TRAINING_SOUNDFONTS)
    train, rate = sf.read(tree / "audio/tuba/train_tuba_000.wav")
    test, _ = sf.read(tree / "audio/tuba/test_tuba_000.wav")
    assert rate == 16000 and not np.allclose(train, test)  # splits hold different melodies


def test_varied_rendering_is_deterministic_and_varies():
    assert synth_music.HELD_OUT_SOUNDFONT not in synth_music.TRAINING_SOUNDFONTS
    renderer = synth_music.Renderer()

    def clip(seed, soundfont="sf_GMbank", label="violin", vary=True, using=renderer):
        return synth_music.render_clip(using, label, np.random.default_rng(seed), 2.0,
                                       soundfont, vary)

    first, performance = clip(7)
    assert first.shape == (32000,) and first.dtype == np.float32
    assert 0.39 < np.abs(first).max() <= 0.9 and np.isfinite(first).all()
    clip(8, "OPL-3_FM_128M", "cello")  # other clips in between change nothing
    np.testing.assert_array_equal(clip(7)[0], first)
    np.testing.assert_array_equal(clip(7, using=synth_music.Renderer())[0], first)
    # Other draws play and record the same instrument differently.
    performances = [clip(seed)[1] for seed in range(12)]
    assert len({p.velocity_gamma for p in performances}) == 12
    assert any(p.vibrato_cents > 0 for p in performances)
    assert any(p.vibrato_cents == 0 for p in performances)
    assert all(p.vibrato_cents == 0 and p.scoop_probability == 0
               for p in (clip(s, label="xylophone")[1] for s in range(4)))
    assert {clip(s, label="saxophone")[1].program for s in range(12)} == {64, 65, 66}
    plain, plain_performance = clip(7, "FluidR3_GM", vary=False)
    assert plain_performance == synth_music.Performance(program=40)
    assert not np.allclose(plain, clip(7, "TimGM6mb", vary=False)[0])


def test_plain_rendering_plays_each_instruments_own_program(tmp_path):
    """``vary=False`` (config.data.synth_vary; the CLIPSonic demo's dataset): every clip is the
    instrument's own General MIDI program, recorded as rendered."""
    labels = ("saxophone", "acoustic guitar")
    kwargs = dict(clips_per_class=(3, 0, 0), seconds=1.0, labels=labels)
    plain = synth_music.write_tree(tmp_path / "plain", vary=False, **kwargs)
    varied = synth_music.write_tree(tmp_path / "varied", **kwargs)
    programs = lambda tree: {  # noqa: E731
        row[0]: int(row[2]) for row in (line.split(",") for line in
                                        (tree / "renderings.csv").read_text().splitlines()[1:])}
    own = {f"audio/{label.replace(' ', '_')}/train_{label.replace(' ', '_')}_{i:03d}.wav":
           synth_music.INSTRUMENTS[label][0] for label in labels for i in range(3)}
    assert programs(plain) == own
    clip = "audio/saxophone/train_saxophone_000.wav"
    assert not np.allclose(sf.read(plain / clip)[0], sf.read(varied / clip)[0])


def test_a_missing_soundfont_names_the_file_and_the_package(monkeypatch, tmp_path):
    missing = str(tmp_path / "FluidR3_GM.sf2")
    monkeypatch.setitem(synth_music.SOUNDFONTS, "FluidR3_GM", (missing, "apt-get install "
                                                                "fluid-soundfont-gm"))
    with pytest.raises(FileNotFoundError, match=r"FluidR3_GM\.sf2: .*apt-get install "
                                                r"fluid-soundfont-gm"):
        synth_music.write_tree(tmp_path / "tree", (0, 0, 0, 1), seconds=1.0, labels=("tuba",))
    assert not (tmp_path / "tree").exists()
    with pytest.raises(ValueError, match="expected 3 or 4 counts"):
        synth_music.write_tree(tmp_path / "tree", (1, 1), seconds=1.0)


def test_demo_end_to_end(tmp_path):
    workdir, data = tmp_path / "run", tmp_path / "data"
    command = [
        sys.executable, "-m", "clipsep_jax.main", "--config=configs/demo.py",
        f"--workdir={workdir}", f"--config.data.data_dir={data}",
        "--config.data.synth_clips_per_class=(3,1,1,1)", "--config.data.synth_seconds=4.0",
        "--config.train.num_steps=12", "--config.train.batch_size=8",
        "--config.train.lr_warmup_steps=2", "--config.train.checkpoint_every_steps=6",
        "--config.train.validation_every_steps=12", "--config.train.log_every_steps=6",
        "--config.eval.num_audio_examples=2", "--config.eval.num_workers=0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert "synth_music ready: {'train': 33, 'val': 11, 'test': 11, 'held_out': 11}" in out
    assert "step 12/12" in out
    assert "| mixture (baseline) | - | 11 |" in out and "| image | - |" in out
    assert "| text | - |" in out
    # The held-out soundfont's mixtures are scored after the test split's.
    assert out.index("(test + test)") < out.index("11 test mixtures of 2 sources (held_out + "
                                                  "held_out)")
    assert (workdir / "evaluation" / "held_out_2src_step12.md").is_file()
    examples = sorted((workdir / "evaluation" / "test_2src_step12_examples").iterdir())
    assert len(examples) == 2
    names = {p.name for p in examples[0].iterdir()}
    assert {"mixture.wav", "truth.wav", "image.wav", "text.wav", "mixture.png",
            "image_mask.png"} <= names
    label = examples[0].name.split("_", 1)[1].replace("_", " ")
    separated = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.separate", f"--workdir={workdir}",
         f"--input={examples[0] / 'mixture.wav'}", f"--text={label}",
         f"--output-dir={tmp_path / 'separated'}"],
        capture_output=True, text=True, cwd=REPO, check=False)
    assert separated.returncode == 0, separated.stderr[-3000:]
    estimate, rate = sf.read(tmp_path / "separated" / "mixture" / f"{label.replace(' ', '_')}.wav")
    mixture, _ = sf.read(examples[0] / "mixture.wav")
    assert rate == 16000 and estimate.shape == mixture.shape
    # A second run finds the dataset prepared and the training finished.
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert again.returncode == 0 and "preparing synth_music" not in again.stdout
