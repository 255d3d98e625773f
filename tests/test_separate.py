"""Separation of recordings: chunked = one pass, any rate and channels, files, bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch_reference as tr
from media_trees import tone
from PIL import Image

from clipsep_jax.clip import CLIP
from clipsep_jax.encoders.clip_towers import CLIPConfig, TowerConfig
from clipsep_jax.separate import (
    Separator,
    _write_outputs,
    main,
    output_folders,
    output_names,
    query_file_name,
)
from clipsep_jax.separation import (
    SeparationError,
    blend_windows,
    separate_channels,
    signal_to_distortion,
    window_starts,
)


def two_instrument_mix(seconds: float, rate: int = 16000):
    """Sources shaped like the generated training data: accordion ~220 Hz, tuba ~70 Hz."""
    accordion = tone(seconds, rate, 242.0, seed=1)
    tuba = tone(seconds, rate, 77.0, seed=2)
    return accordion, tuba, (accordion + tuba) / 2


def class_frame(label: str) -> np.ndarray:
    """A frame like the training data's: the class colour with pixel noise."""
    colour = np.array([220, 60, 40] if label == "accordion" else [40, 80, 220], np.float32)
    noise = np.random.default_rng(7).normal(0, 20, (64, 64, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("frames,window,overlap", [(50, 64, 16), (64, 64, 16), (300, 64, 16),
                                                   (301, 32, 31), (1000, 128, 1)])
def test_blended_windows_give_back_a_framewise_models_masks(frames, window, overlap):
    """A model whose masks depend on each frame alone gives the same masks window by window as
    over the whole recording: the cross-fades weigh to 1 everywhere."""
    starts = window_starts(frames, window, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, frames - window)
    assert all(0 < b - a <= window - overlap for a, b in zip(starts, starts[1:], strict=False))
    magnitude = np.random.default_rng(frames).random((5, frames)).astype(np.float32)
    calls, fractions = [], []

    def masks_of(windows):
        calls.append(windows.shape)
        return np.stack([np.tanh(windows), windows**2], axis=1)

    masks = blend_windows(magnitude, window, overlap, masks_of, batch_size=3,
                          progress=fractions.append)
    np.testing.assert_allclose(masks, np.stack([np.tanh(magnitude), magnitude**2]), rtol=1e-5)
    assert all(shape[0] <= 3 and shape[1:] == (5, window) for shape in calls)
    assert sum(shape[0] for shape in calls) == len(starts) and fractions[-1] == 1.0
    with pytest.raises(SeparationError, match="overlap"):
        window_starts(frames, window, window)


def test_channels_rates_and_the_residual_around_any_lane_separator():
    """separate_channels: each channel (or the mean) at the model's rate, outputs like the input,
    the residual = input - what the queries took, progress over lanes, bad input named."""
    rate, model_rate = 22050, 16000
    stereo = np.random.default_rng(0).normal(0, 0.1, (2 * rate, 2)).astype(np.float32)
    seen = []

    def halves(lane, progress):
        seen.append(len(lane))
        if progress is not None:
            progress(1.0)
        return np.stack([lane / 2, lane / 4]), 3 * lane / 4, len(seen)

    fractions = []
    outputs, first = separate_channels(stereo, rate, model_rate, halves, progress=fractions.append)
    assert seen == [2 * model_rate] * 2 and first == 1
    assert [o.shape for o in outputs] == [stereo.shape] * 3
    np.testing.assert_allclose(sum(outputs[:2]) + outputs[2], stereo, atol=1e-6)
    np.testing.assert_allclose(outputs[2], stereo - 3 * outputs[1], atol=1e-6)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    down, _ = separate_channels(stereo, rate, model_rate, halves, channels="downmix")
    np.testing.assert_allclose(down[0][:, 0], down[0][:, 1])
    mono, _ = separate_channels(stereo[:, 0], model_rate, model_rate, halves)
    np.testing.assert_allclose(mono[0], stereo[:, 0] / 2, rtol=1e-6)
    for bad, match in [(np.zeros((0,)), "expected audio"), (np.full(8, np.nan), "NaN"),
                       (np.zeros((4, 2, 2)), "expected audio")]:
        with pytest.raises(SeparationError, match=match):
            separate_channels(bad, rate, model_rate, halves)
    with pytest.raises(SeparationError, match="channels must be"):
        separate_channels(stereo, rate, model_rate, halves, channels="left")


@pytest.fixture(scope="module")
def separator(trained_workdir, tiny_clip_folder):
    return Separator.from_checkpoint(trained_workdir, clip=tiny_clip_folder)


@pytest.mark.parametrize("seconds,window,overlap", [(10.0, 256, 128), (60.0, 1024, 256)])
def test_chunked_equals_one_pass(separator, seconds, window, overlap):
    separator.window_frames, separator.overlap_frames = window, overlap
    accordion, tuba, mix = two_instrument_mix(seconds)
    queries = [class_frame("accordion"), class_frame("tuba"), "accordion"]
    chunked = separator.separate(mix, 16000, queries)
    whole = separator.separate(mix, 16000, queries, one_pass=True)
    for name, source in (("image_0", accordion / 2), ("image_1", tuba / 2)):
        sdr_chunked = float(signal_to_distortion(source, chunked[name]))
        sdr_whole = float(signal_to_distortion(source, whole[name]))
        assert abs(sdr_chunked - sdr_whole) <= 0.1, (name, sdr_chunked, sdr_whole)
        mixture_sdr = float(signal_to_distortion(source, mix))
        assert sdr_chunked > mixture_sdr + 3.0, (name, sdr_chunked, mixture_sdr)  # it separates
    assert chunked["accordion"].shape == mix.shape


def test_rate_channels_and_length_are_kept(separator):
    _, _, mix = two_instrument_mix(3.3, rate=44100)
    stereo = np.stack([mix, 0.5 * mix], axis=1)
    each = separator.separate(stereo, 44100, ["accordion"])
    assert set(each) == {"accordion", "residual"}
    assert each["accordion"].shape == stereo.shape
    np.testing.assert_allclose(each["accordion"][:, 1], 0.5 * each["accordion"][:, 0],
                               atol=0.05)
    downmix = separator.separate(stereo, 44100, ["accordion"], channels="downmix")
    np.testing.assert_array_equal(downmix["accordion"][:, 0], downmix["accordion"][:, 1])


def test_short_and_silent_input(separator):
    out = separator.separate(np.zeros(100, np.float32), 16000, ["tuba"])
    assert out["tuba"].shape == (100,) and not out["tuba"].any()
    out = separator.separate(np.zeros(16000 * 2, np.float32), 8000, ["tuba"])
    assert out["tuba"].shape == (32000,) and np.isfinite(out["tuba"]).all()
    # Shorter than one STFT window (0.01 s): the query gets silence, the residual everything.
    short = two_instrument_mix(0.01)[2]
    out = separator.separate(short, 16000, ["tuba"])
    assert not out["tuba"].any()
    np.testing.assert_array_equal(out["residual"], short)


def test_outputs_add_up_to_a_44k_stereo_input(separator):
    """One query: its output plus the residual is the input, and what the 16 kHz model cannot
    see (here a 12 kHz tone) stays in the residual."""
    rate = 44100
    accordion, tuba, _ = two_instrument_mix(4.0, rate=rate)
    t = np.arange(len(tuba)) / rate
    high = (0.1 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32)
    stereo = np.stack([(accordion + tuba) / 2 + high, (accordion + tuba) / 2 - high], axis=1)
    out = separator.separate(stereo, rate, ["tuba"])
    total = out["tuba"] + out["residual"]
    assert np.abs(total - stereo).max() <= 1e-3 * np.abs(stereo).max()

    def band_energy(x):
        spectrum = np.abs(np.fft.rfft(x[:, 0]))
        frequencies = np.fft.rfftfreq(len(x), 1 / rate)
        return float(np.sum(spectrum[(frequencies > 11500) & (frequencies < 12500)] ** 2))

    assert band_energy(out["residual"]) > 0.99 * band_energy(stereo)
    assert band_energy(out["tuba"]) < 1e-6 * band_energy(stereo)


def test_command_writes_every_query_and_the_residual(trained_workdir, tiny_clip_folder,
                                                     tmp_path):
    _, _, mix = two_instrument_mix(4.0, rate=22050)
    sf.write(tmp_path / "song.wav", np.stack([mix, mix], 1), 22050)
    Image.fromarray(class_frame("tuba")).save(tmp_path / "frame.png")
    code = main(["--workdir", trained_workdir, "--clip", tiny_clip_folder,
                 "--input", str(tmp_path / "song.wav"), "--text", "accordion / solo?",
                 "--image", str(tmp_path / "frame.png"), "--output-dir", str(tmp_path / "out")])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "out" / "song").iterdir())
    assert files == [".clipsep-separate.json", "accordion_solo.wav", "image_frame.wav",
                     "residual.wav"]
    data, rate = sf.read(tmp_path / "out" / "song" / "accordion_solo.wav")
    assert rate == 22050 and data.shape == (len(mix), 2)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_folder_mode_and_mp3(trained_workdir, tiny_clip_folder, tmp_path):
    _, _, mix = two_instrument_mix(2.0)
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", mix, 16000)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tmp_path / "in" / "a.wav"),
                    str(tmp_path / "in" / "b.mp3")], check=True)
    code = main(["--workdir", trained_workdir, "--clip", tiny_clip_folder, "--input",
                 str(tmp_path / "in"), "--text", "tuba", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]


class Printed:
    """What a finished command printed (the ``capsys.readouterr()`` shape)."""

    def __init__(self, out: str, err: str):
        self.out, self.err = out, err


def run_separate(trained_workdir, tiny_clip_folder, *args) -> tuple[int, Printed]:
    """``python -m clipsep_jax.separate`` as the user runs it: (exit code, what it printed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPSEP_DEBUG", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.separate", "--workdir", trained_workdir, "--clip",
         tiny_clip_folder, *map(str, args)], capture_output=True, text=True, check=False,
        env=env)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, Printed(result.stdout, result.stderr)


def test_never_replaces_what_it_did_not_write(trained_workdir, tiny_clip_folder, tmp_path):
    _, _, mix = two_instrument_mix(1.0)
    home = tmp_path / "h"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "taxes.txt").write_text("x")
    sf.write(home / "Documents.wav", mix, 16000)
    code, printed = run_separate(trained_workdir, tiny_clip_folder, "--input",
                                 home / "Documents.wav", "--text", "violin", "--output-dir", home)
    assert code == 2 and "was not written by clipsep_jax.separate" in printed.err
    assert sorted(p.name for p in (home / "Documents").iterdir()) == ["taxes.txt"]

    # Its own earlier outputs: refused without --overwrite, replaced file by file with it.
    out = tmp_path / "out"
    args = ["--input", home / "Documents.wav", "--text", "violin", "--output-dir", out]
    assert run_separate(trained_workdir, tiny_clip_folder, *args)[0] == 0
    (out / "Documents" / "notes.txt").write_text("mine")
    code, printed = run_separate(trained_workdir, tiny_clip_folder, *args, "--text", "tuba")
    assert code == 2 and "--overwrite" in printed.err
    assert run_separate(trained_workdir, tiny_clip_folder, *args, "--overwrite")[0] == 0
    assert sorted(p.name for p in (out / "Documents").iterdir()) == [
        ".clipsep-separate.json", "notes.txt", "residual.wav", "violin.wav"]
    assert ((out / "Documents").stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unique_names_and_a_batch_that_goes_on(trained_workdir, tiny_clip_folder, tmp_path):
    _, _, mix = two_instrument_mix(1.0)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.wav", "a.flac", "sub/a.wav", "c.wav"):
        sf.write(folder / name, mix, 16000)
    (folder / "bad.wav").write_bytes(b"RIFF????WAVEjunk")
    out = folder / "separated"  # inside the input folder: not read back as input
    args = ["--input", folder, "--output-dir", out, "--text", "violin", "--text", "violin",
            "--text", "residual"]
    code, printed = run_separate(trained_workdir, tiny_clip_folder, *args)
    assert code == 2
    assert "bad.wav: cannot read audio" in printed.err
    assert "4 of 5 files separated; failed: " in printed.out and "bad.wav" in printed.out
    assert "query 'violin' -> violin_2.wav" in printed.out
    assert "query 'residual' -> residual_query.wav" in printed.out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.wav"))
    expected = sorted(f"{d}/{f}.wav" for d in ("a_wav", "a_flac", "sub/a", "c")
                      for f in ("violin", "violin_2", "residual_query", "residual"))
    assert written == expected
    # The queries' outputs and the residual are distinct files: the residual is what no
    # query took, and "violin" twice gives the same estimate twice.
    violin, _ = sf.read(out / "c" / "violin.wav")
    again, _ = sf.read(out / "c" / "violin_2.wav")
    residual, _ = sf.read(out / "c" / "residual.wav")
    np.testing.assert_array_equal(violin, again)
    assert not np.allclose(violin, residual)
    # A second run finds its own outputs and refuses them (no --overwrite), but reads none of
    # them as input.
    code, printed = run_separate(trained_workdir, tiny_clip_folder, *args)
    assert code == 2 and "0 of 5 files separated" in printed.out


def test_an_unreadable_checkpoint_is_one_line(trained_workdir, tiny_clip_folder, tmp_path):
    from test_training import corrupt

    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    for step in (workdir / "checkpoints").iterdir():
        if step.name.isdigit():
            corrupt(step)
    _, _, mix = two_instrument_mix(1.0)
    sf.write(tmp_path / "mix.wav", mix, 16000)
    code, printed = run_separate(str(workdir), tiny_clip_folder, "--input", tmp_path / "mix.wav",
                                 "--text", "tuba", "--output-dir", tmp_path / "out")
    assert code == 2 and "cannot be read" in printed.err
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.evaluate", f"--workdir={workdir}",
         "--checkpoint=latest"], capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k not in ("CLIPSEP_DEBUG", "XLA_FLAGS")})
    assert result.returncode == 2 and "cannot be read" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_output_names_are_unique_and_never_the_residual():
    assert output_names(["image_frame", "image_frame", "residual", "小提琴", "violin"]) == [
        "image_frame", "image_frame_2", "residual_query", "query", "violin", "residual"]


@pytest.mark.parametrize("args,message", [
    (["--input", "{tmp}/missing.wav", "--text", "tuba"], "missing.wav: no such file"),
    (["--input", "{tmp}/noise.wav", "--text", "tuba"], "noise.wav: cannot read audio"),
    (["--input", "{tmp}/notes.txt", "--text", "tuba"], "notes.txt: unknown format .txt"),
    (["--input", "{tmp}/ok.wav", "--text", " "], "--text: empty query"),
    (["--input", "{tmp}/ok.wav"], "no queries"),
    (["--input", "{tmp}/ok.wav", "--image", "{tmp}/notes.txt"], "notes.txt: cannot read the image"),
])
def test_bad_input_gives_a_clear_error(trained_workdir, tiny_clip_folder, tmp_path, capsys,
                                       args, message):
    (tmp_path / "noise.wav").write_bytes(b"RIFF????WAVEjunk")
    (tmp_path / "notes.txt").write_text("hello")
    sf.write(tmp_path / "ok.wav", np.zeros(1600, np.float32), 16000)
    args = [a.format(tmp=tmp_path) for a in args]
    code = main(["--workdir", trained_workdir, "--clip", tiny_clip_folder,
                 "--output-dir", str(tmp_path / "out"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert (tmp_path / "notes.txt").read_text() == "hello"


@pytest.mark.parametrize("args,message", [
    (["--input", "{tmp}/empty.wav", "--text", "tuba"], "empty.wav: expected audio"),
    (["--input", "{tmp}/nan.wav", "--text", "tuba"], "nan.wav: the recording contains NaN"),
    (["--input", "{tmp}/ok.wav", "--text", "tuba", "--clip", "{tmp}/nowhere"],
     "nowhere' cannot be loaded"),
    (["--input", "{tmp}/ok.wav", "--text", "tuba", "--output-dir", "{tmp}/notes.txt"],
     "notes.txt: is a file"),
])
def test_bad_files_and_values_as_the_user_types_them(trained_workdir, tiny_clip_folder,
                                                    tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("hello")
    sf.write(tmp_path / "ok.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    code, printed = run_separate(trained_workdir, tiny_clip_folder, "--output-dir",
                                 tmp_path / "out", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in printed.err, printed.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert (tmp_path / "notes.txt").read_text() == "hello"


def test_the_command_line_reports_a_user_error_in_one_line(tmp_path):
    """The command as a user runs it: exit code 2, one line naming the value, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.separate", "--checkpoint", str(tmp_path / "none"),
         "--input", str(tmp_path), "--text", "violin", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "CLIPSEP_DEBUG"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "no audio or video files in this folder" in result.stderr


def test_converted_reference_checkpoint_and_model_kind_errors(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(tr.CLIPSep(layers=5, ngf=8, channels=4).state_dict(), tmp_path / "ref.pt")
    clip = CLIP.random(CLIPConfig(
        vision=TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=16),
        text=TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=520, max_position_embeddings=64),
        projection_dim=512))
    separator = Separator.from_checkpoint(str(tmp_path / "ref.pt"), model_kind="clipsep",
                                          clip=clip)
    out = separator.separate(two_instrument_mix(5.0)[2], 16000, ["tuba", "accordion"])
    assert set(out) == {"tuba", "accordion", "residual"}
    torch.save(tr.PITSep(layers=5, ngf=8, channels=4).state_dict(), tmp_path / "pit.pt")
    sf.write(tmp_path / "x.wav", np.zeros(1600, np.float32), 16000)
    code = main(["--checkpoint", str(tmp_path / "pit.pt"), "--model_kind", "pit", "--input",
                 str(tmp_path / "x.wav"), "--text", "a", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "model kind 'pit' cannot take text or image queries" in capsys.readouterr().err
    code = main(["--checkpoint", str(tmp_path / "ref.pt"), "--input", str(tmp_path / "x.wav"),
                 "--text", "a",
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "needs --model_kind" in capsys.readouterr().err


def test_query_file_names():
    taken = set()
    assert query_file_name("playing bagpipes", taken) == "playing_bagpipes"
    assert query_file_name("playing bagpipes", taken) == "playing_bagpipes_2"
    assert query_file_name("../../etc/passwd", taken) == "etc_passwd"
    assert query_file_name("residual", taken) == "residual_query"


def test_help():
    result = subprocess.run([sys.executable, "-m", "clipsep_jax.separate", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for flag in ("--checkpoint", "--workdir", "--input", "--text", "--image", "--output-dir",
                 "--channels"):
        assert flag in result.stdout


@pytest.fixture
def small_mounts(tmp_path):
    """A full (64 KiB) and a read-only tmpfs, where this machine lets the tests mount them."""
    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    mounted = []
    for folder, options in ((full, "size=64k"), (readonly, "ro,size=64k")):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, check=False)
        if result.returncode != 0:
            for m in mounted:
                subprocess.run(["umount", str(m)], check=False)
            pytest.skip("mounting a tmpfs needs privileges this machine does not give")
        mounted.append(folder)
    yield full, readonly
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_or_read_only_output_folder_is_one_line(trained_workdir, tiny_clip_folder,
                                                       tmp_path, small_mounts):
    full, readonly = small_mounts
    _, _, mix = two_instrument_mix(3.0)
    sf.write(tmp_path / "mix.wav", mix, 16000)
    code, printed = run_separate(trained_workdir, tiny_clip_folder, "--input",
                                 tmp_path / "mix.wav", "--text", "tuba", "--output-dir", readonly)
    assert code == 2 and "not writable" in printed.err
    code, printed = run_separate(trained_workdir, tiny_clip_folder, "--input",
                                 tmp_path / "mix.wav", "--text", "tuba", "--output-dir", full)
    assert code == 2 and "cannot write the outputs" in printed.err, printed.err
    assert list(full.iterdir()) == []  # the half-written temporary folder is gone


def test_output_folders_stay_unique(tmp_path):
    inputs = [str(tmp_path / n) for n in ("a.wav", "a.flac", "a_wav.ogg", "sub/a.wav", "B.wav",
                                          "b.WAV")]
    folders = output_folders(inputs, str(tmp_path), "out")
    names = [str(f) for f in folders.values()]
    assert len({n.lower() for n in names}) == len(names), names
    assert folders[inputs[3]] == Path("out/sub/a")


def test_overwrite_replaces_only_its_own_files(tmp_path):
    folder = tmp_path / "song"
    wave = np.zeros(100, np.float32)
    _write_outputs(folder, {"guitar": wave, "residual": wave}, 16000)
    (folder / "piano.wav").write_text("the user's own")
    with pytest.raises(SeparationError, match="piano.wav was not written by"):
        _write_outputs(folder, {"piano": wave, "residual": wave}, 16000, overwrite=True)
    assert (folder / "piano.wav").read_text() == "the user's own"
    assert (folder / "guitar.wav").exists()
    _write_outputs(folder, {"violin": wave, "residual": wave}, 16000, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".clipsep-separate.json", "piano.wav", "residual.wav", "violin.wav"]
