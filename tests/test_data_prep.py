"""data_prep: both input layouts, skip report, read-back values, resume, Beam DirectRunner."""

import csv
import os
import shutil
import subprocess
import sys

import librosa
import ml_collections
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
from conftest import tiny_hf_config
from media_trees import SR, index_tree, tone, videos_tree

from clipsep_jax import audio, input_pipeline
from clipsep_jax.clip import CLIP, config_from_transformers, text_prompt
from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep.captions import split_caption
from data_prep import audiocaps, build, extract, media
from data_prep.sources import _is_validation

TINY = config_from_transformers(tiny_hf_config())


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIP.random(TINY, seed=0).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def index_build(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("index_in")
    expected = index_tree(root)
    out = tmp_path_factory.mktemp("index_out")
    builder = build.run(
        [
            "--dataset=music",
            f"--manual_dir={root}",
            f"--data_dir={out}",
            f"--clip={tiny_clip_dir}",
            "--clip_batch_size=8",
            "--clips_per_shard=4",
            "--min_samples=65535",
        ]
    )
    return root, out, expected, builder


def read_report(version_dir):
    with open(os.path.join(version_dir, "skipped.csv"), newline="") as f:
        return list(csv.DictReader(f))


def read_all(data_dir, name):
    sources = tfds.data_source(name, data_dir=str(data_dir))
    return {
        split: {ex["id"].decode(): ex for ex in (src[i] for i in range(len(src)))}
        for split, src in sources.items()
    }


def test_index_layout_builds_and_reads_back(index_build, tiny_clip_dir):
    root, out, expected, builder = index_build
    examples = read_all(out, "music")
    assert {k: sorted(v) for k, v in examples.items()} == {
        "train": ["accordion/acc1", "accordion/acc2", "tuba/tuba1", "tuba/tuba2"],
        "val": ["accordion/acc3"],
        "test": ["tuba/tuba3"],
    }
    clip = CLIP.from_pretrained(tiny_clip_dir)
    for split, by_id in examples.items():
        for clip_id, ex in by_id.items():
            label = clip_id.split("/")[0]
            assert ex["label"].decode() == label and ex["split"].decode() == split
            wave = ex["waveform"]
            assert wave.dtype == np.float32 and wave.ndim == 1
            # The stored spectrogram is the STFT of the stored waveform.
            stft = ex["stft"]
            assert stft.dtype == np.float32 and stft.shape == (1 + len(wave) // 256, 513, 2)
            want = librosa.stft(wave, n_fft=1024, hop_length=256, pad_mode="reflect").T
            got = stft[..., 0] + 1j * stft[..., 1]
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
            np.testing.assert_allclose(got, np.asarray(audio.stft(wave)).T, rtol=0, atol=1e-4)
            # Frame embeddings: the Flax CLIP on those frames, stored as float16.
            frames_dir = os.path.join(root, "frames", label, clip_id.split("/")[1])
            frames = [
                media.load_frame(os.path.join(frames_dir, f))
                for f in sorted(os.listdir(frames_dir))
            ]
            assert ex["frame_embeddings"].dtype == np.float16
            assert ex["frame_embeddings"].shape == (5, 40)
            np.testing.assert_allclose(
                ex["frame_embeddings"],
                clip.encode_image(frames).astype(np.float16),
                rtol=1e-3,
                atol=1e-3,
            )
            np.testing.assert_allclose(
                ex["text_embedding"],
                clip.encode_text([text_prompt(label)])[0],
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_allclose(
                ex["text_embedding_ensemble"],
                clip.encode_prompt_ensemble([label])[0],
                rtol=1e-5,
                atol=1e-6,
            )
    # Audio at another rate is resampled as librosa.load does; stereo is averaged.
    tuba1 = examples["train"]["tuba/tuba1"]["waveform"]
    want, _ = librosa.load(os.path.join(root, "audio/tuba/tuba1.wav"), sr=SR, mono=True)
    np.testing.assert_allclose(tuba1, want, atol=1e-5)
    tuba2 = examples["train"]["tuba/tuba2"]["waveform"]
    stereo, _ = sf.read(os.path.join(root, "audio/tuba/tuba2.wav"), dtype="float32")
    np.testing.assert_allclose(tuba2, stereo.mean(axis=1), atol=1e-6)
    # Metadata for the training pipeline.
    metadata = tfds.builder("music", data_dir=str(out)).info.metadata
    assert metadata["labels"] == ["accordion", "tuba"]
    assert metadata["sample_rate"] == SR and metadata["hop_length"] == 256


def test_index_layout_skip_report(index_build):
    root, out, expected, builder = index_build
    rows = read_report(builder.data_path)
    got = {}
    for row in rows:
        key = row["source"]
        if row["reason"].startswith("duplicate id"):
            key = "dup:" + key
        got[key] = row["reason"].split(":")[0]
    want = {k: v for k, v in expected.items() if not v.startswith("ok")}
    assert got == want, rows
    assert all(r["split"] in ("train", "val", "test") for r in rows)
    assert builder.last_notes == {"resampled from 44100 Hz": 1, "downmixed 2 channels": 1}


def test_rerun_reuses_finished_work_shards(index_build, tiny_clip_dir, monkeypatch):
    """The rebuild reuses the work shards; it also goes through TFDS's on-disk shuffle (as a
    split over 1 GB does), which without TensorFlow needs data_prep.tfds_compat."""
    root, out, expected, builder = index_build
    before = read_all(out, "music")

    def no_extraction(*args, **kwargs):
        raise AssertionError("a finished work shard was extracted again")

    monkeypatch.setattr(extract.Extractor, "run", no_extraction)
    monkeypatch.setattr(tfds.core.shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    rebuilt = build.run(
        [
            "--dataset=music",
            f"--manual_dir={root}",
            f"--data_dir={out}",
            f"--clip={tiny_clip_dir}",
            "--clip_batch_size=8",
            "--clips_per_shard=4",
            "--overwrite",
        ]
    )
    after = read_all(out, "music")
    assert before.keys() == after.keys()
    for split in before:
        for clip_id, ex in before[split].items():
            for key in ("waveform", "stft", "frame_embeddings"):
                np.testing.assert_array_equal(after[split][clip_id][key], ex[key])
    assert len(rebuilt.last_skips) == len(builder.last_skips)


def test_beam_direct_runner_gives_the_same_examples(index_build, tiny_clip_dir, tmp_path):
    pytest.importorskip("apache_beam")
    root, out, expected, builder = index_build
    beam_out = tmp_path / "beam"
    beam_builder = build.run(
        [
            "--dataset=music",
            f"--manual_dir={root}",
            f"--data_dir={beam_out}",
            f"--clip={tiny_clip_dir}",
            "--clip_batch_size=8",
            "--beam_runner=DirectRunner",
        ]
    )
    direct, beam = read_all(out, "music"), read_all(beam_out, "music")
    assert {k: sorted(v) for k, v in beam.items()} == {k: sorted(v) for k, v in direct.items()}
    for split in direct:
        for clip_id, ex in direct[split].items():
            for key, value in ex.items():
                np.testing.assert_array_equal(beam[split][clip_id][key], value, err_msg=key)
    assert sorted(map(str, read_report(beam_builder.data_path))) == sorted(
        map(str, read_report(builder.data_path))
    )


def test_videos_layout(tmp_path, tiny_clip_dir):
    root = tmp_path / "in"
    expected = videos_tree(root)
    out = tmp_path / "out"
    builder = build.run(
        [
            "--dataset=vggsound",
            f"--manual_dir={root}",
            f"--data_dir={out}",
            f"--clip={tiny_clip_dir}",
            "--val_fraction=0",
            "--clip_batch_size=8",
        ]
    )
    examples = read_all(out, "vggsound")
    ok = sorted(k for k, v in expected.items() if v.startswith("ok"))
    assert sorted(i for split in examples.values() for i in split) == ok
    ex = examples["train"]["dogA_000030"]
    assert ex["label"].decode() == "dog barking"
    assert len(ex["waveform"]) == pytest.approx(5 * SR, abs=SR // 10)
    assert ex["frame_embeddings"].shape[0] in (5, 6)  # ffmpeg's fps filter at 1 fps
    spec = ex["stft"][..., 0] + 1j * ex["stft"][..., 1]
    want = librosa.stft(ex["waveform"], n_fft=1024, hop_length=256, pad_mode="reflect").T
    assert np.abs(spec - want).max() <= 1e-5 * np.abs(want).max()
    # The test clip's label prompt (", " kept in the label, as the reference's prompt reads).
    clip = CLIP.from_pretrained(tiny_clip_dir)
    np.testing.assert_allclose(
        examples["test"]["carB_000030"]["text_embedding"],
        clip.encode_text([text_prompt("people, crowd")])[0],
        rtol=1e-5,
        atol=1e-6,
    )
    rows = read_report(builder.data_path)
    got = {}
    for row in rows:
        reason = row["reason"].split(":")[0]
        clip_id = os.path.splitext(os.path.basename(row["source"].split(" ")[0]))[0]
        if reason == "duplicate id":
            clip_id = "dup:" + row["reason"].split(": ")[1].split(" ")[0]
        elif reason == "video file not found":
            clip_id = row["source"].split("(")[1].rstrip(")") + "_000030"
        got[clip_id] = reason
    assert got == {k: v for k, v in expected.items() if not v.startswith("ok")}, rows
    assert builder.last_notes["resampled from 44100 Hz"] == 1


def test_stored_spectrogram_buckets_equal_the_plain_stft():
    rng = np.random.default_rng(0)
    options = extract.ExtractOptions()
    for n in (600, 16000, 65535, 160000, 160001):
        wave = rng.standard_normal(n).astype(np.float32)
        got = extract.stored_spectrogram(wave, options)
        want = np.asarray(audio.stft(wave)).T
        np.testing.assert_allclose(
            got[..., 0] + 1j * got[..., 1], want, rtol=0, atol=2e-5 * np.abs(want).max()
        )


def test_cli_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.build", "--helpshort"],
        capture_output=True,
        text=True,
        check=False,
    )
    text = result.stdout + result.stderr
    for flag in (
        "--dataset",
        "--manual_dir",
        "--data_dir",
        "--clip",
        "--layout",
        "--root",
        "--beam_runner",
        "--beam_options",
        "--clips_per_shard",
        "--silence_threshold",
        "--min_samples",
        "--[no]trim_videos",
        "--[no]overwrite",
        "--[no]fresh",
    ):
        assert flag in text, flag


def test_bad_arguments_are_named(tmp_path, tiny_clip_dir):
    with pytest.raises(Exception, match="no such folder"):
        build.run(
            [
                "--dataset=music",
                f"--manual_dir={tmp_path / 'nope'}",
                f"--data_dir={tmp_path}",
                f"--clip={tiny_clip_dir}",
            ]
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither train.csv"):
        build.run(
            [
                "--dataset=music",
                f"--manual_dir={tmp_path / 'empty'}",
                f"--data_dir={tmp_path / 'o'}",
                f"--clip={tiny_clip_dir}",
            ]
        )


def run_build(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CLIPSEP_DEBUG"}
    return subprocess.run([sys.executable, "-m", "data_prep.build", "--dataset=music", *args],
                          capture_output=True, text=True, check=False, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_split_without_usable_clips_is_refused_with_its_report(tmp_path, tiny_clip_dir):
    """train.csv rows of two columns: refused naming the split (it used to build a dataset
    without a train split); swapped columns: every clip skipped, refused with the report kept
    (it used to end in TFDS's AssertionError with no report)."""
    root = tmp_path / "in"
    index_tree(root)
    with open(root / "train.csv") as f:
        rows = list(csv.reader(f))
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([r[:2] for r in rows])
    result = run_build(f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}",
                       f"--clip={tiny_clip_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "no usable clip listed for split(s) train" in result.stderr
    report = result.stderr.split(" in ")[1].split(" (")[0]
    with open(report) as f:
        assert "train" in f.read()
    assert not list((tmp_path / "out").rglob("dataset_info.json"))

    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([[r[1], r[0], *r[2:]] for r in rows])
    result = run_build(f"--manual_dir={root}", f"--data_dir={tmp_path / 'out2'}",
                       f"--clip={tiny_clip_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "split train: all" in result.stderr and "clips were skipped" in result.stderr
    report = result.stderr.split("reasons in ")[1].split(" (")[0]
    with open(report) as f:
        assert len(f.read().splitlines()) > 1


def test_a_manual_dir_without_index_files_is_one_line(tmp_path, tiny_clip_dir):
    (tmp_path / "empty").mkdir()
    result = run_build(f"--manual_dir={tmp_path / 'empty'}", f"--data_dir={tmp_path / 'out'}",
                       f"--clip={tiny_clip_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "neither train.csv" in result.stderr


# ---------------------------------------------------------------------------------------------
# AudioCaps (data_prep/audiocaps.py): captions with their clauses and 16 kHz waveforms, no CLIP

AUDIOCAPS_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]


def write_audiocaps_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([AUDIOCAPS_HEADER, *rows])


def audiocaps_tree(root) -> None:
    """Three 1.5 s clips (one at 22050 Hz, one named by its bare YouTube id), train.csv and
    test.csv with good rows and three bad ones; no val.csv: bird09's clip id hashes into val."""
    (root / "audio").mkdir(parents=True)
    sf.write(root / "audio" / "man00_000030.wav", tone(1.5, SR, 220, seed=1), SR)
    sf.write(root / "audio" / "bird09_10.wav", tone(1.5, 22050, 330, seed=2), 22050)
    sf.write(root / "audio" / "car.wav", tone(1.5, SR, 440, seed=3), SR)
    write_audiocaps_csv(root / "train.csv", [
        [101, "man00", 30, "A man speaks and a dog barks"],
        [102, "bird09", 10, "Birds chirp, wind blows"],
        [103, "gone00", 0, "A door creaks"],  # no media file
        [104, "man00", "thirty", "A man speaks"],  # malformed start
    ])
    write_audiocaps_csv(root / "test.csv", [
        [201, "car", 0, "A car passes by"],
        [202, "car", 0, "An engine hums then a horn honks"],
        [203, "car", 0, ""],  # empty caption
    ])


@pytest.fixture(scope="module")
def audiocaps_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("audiocaps_in")
    audiocaps_tree(root)
    out = tmp_path_factory.mktemp("audiocaps_out")
    builder = build.run(["--dataset=audiocaps", f"--manual_dir={root}", f"--data_dir={out}",
                         "--max_seconds=1.25", "--num_workers=2"])
    return root, out, builder


def test_audiocaps_builds_and_reads_back(audiocaps_build):
    root, out, builder = audiocaps_build
    assert not _is_validation("man00_000030", 0.1) and _is_validation("bird09_000010", 0.1)
    sources = tfds.data_source("audiocaps", data_dir=str(out))
    examples = {split: {int(ex["audiocap_id"]): ex for ex in (src[i] for i in range(len(src)))}
                for split, src in sources.items()}
    assert {split: sorted(by_id) for split, by_id in examples.items()} == {
        "train": [101], "val": [102], "test": [201, 202]}
    man = examples["train"][101]
    assert man["clip_id"].decode() == "man00_000030"
    assert man["caption"].decode() == "A man speaks and a dog barks"
    assert [c.decode() for c in man["clauses"]] == ["A man speaks", "A dog barks"]
    assert split_caption("A man speaks and a dog barks") == ["A man speaks", "A dog barks"]
    engine = examples["test"][202]
    assert engine["clip_id"].decode() == "car_000000"  # the bare {youtube_id} file
    assert [c.decode() for c in engine["clauses"]] == ["An engine hums", "A horn honks"]
    # 16 kHz mono float32 cropped to --max_seconds=1.25: 20000 samples; 22050 Hz resampled.
    for by_id in examples.values():
        for ex in by_id.values():
            assert ex["waveform"].dtype == np.float32 and ex["waveform"].shape == (20000,)
    stored, _ = sf.read(root / "audio" / "man00_000030.wav", dtype="float32")
    np.testing.assert_array_equal(man["waveform"], stored[:20000])
    want, _ = librosa.load(root / "audio" / "bird09_10.wav", sr=SR, mono=True)
    np.testing.assert_allclose(examples["val"][102]["waveform"], want[:20000], atol=1e-5)
    np.testing.assert_array_equal(examples["test"][201]["waveform"], engine["waveform"])
    metadata = tfds.builder_from_directory(os.fspath(builder.data_path)).info.metadata
    assert metadata["sample_rate"] == SR
    assert metadata["caption_splitter"] == "weaksep.captions.split_caption"
    assert builder.last_notes == {"resampled from 22050 Hz": 1}


def test_audiocaps_skip_report(audiocaps_build):
    _, _, builder = audiocaps_build
    rows = read_report(builder.data_path)
    got = {(r["split"], r["source"].split(" ")[0]): r["reason"] for r in rows}
    assert set(got) == {("train", "train.csv:4"), ("train", "train.csv:5"),
                        ("test", "test.csv:4")}, rows
    assert got["train", "train.csv:4"].startswith("media file not found: none named gone00_000000")
    assert got["train", "train.csv:5"] == "malformed csv row: start_time 'thirty' is not a number"
    assert got["test", "test.csv:4"].startswith("empty caption")
    assert len(builder.last_skips) == 3


@pytest.mark.parametrize("which", ["music", "audiocaps"])
def test_record_index_gives_each_records_text_without_reading_it(which, index_build,
                                                                 audiocaps_build, monkeypatch):
    out = (index_build if which == "music" else audiocaps_build)[1]
    data = ml_collections.ConfigDict({"data_dir": str(out), "name": which,
                                      "cache_in_memory": False})
    names = ["label", "id", "split"] if which == "music" else ["clip_id", "caption", "clauses"]
    for split in ("train", "test"):
        source, _ = input_pipeline.open_split(data, split)
        read = [source[i] for i in range(len(source))]
        want = {name: [input_pipeline.as_text(r[name]) for r in read] for name in names}
        records = source.records
        monkeypatch.setattr(source, "records", None)  # any record read now fails
        assert {name: input_pipeline.record_column(source, name) for name in names} == want
        monkeypatch.setattr(source, "records", records)
        every = input_pipeline.every_nth(source, 2, 1)
        assert input_pipeline.record_column(every, names[0]) == want[names[0]][1::2]
    if which == "audiocaps":
        assert input_pipeline.record_column(source, "clauses")[0] == [
            c.decode() for c in read[0]["clauses"]]
    # A dataset prepared before the index: the columns come from the records themselves.
    monkeypatch.setattr(input_pipeline, "RECORD_INDEX_FILE", "absent.json")
    source, _ = input_pipeline.open_split(data, "test")
    assert source.column(names[0]) is None
    assert input_pipeline.record_column(source, names[0]) == want[names[0]]


def test_audiocaps_reader_refusals_and_row_skips(tmp_path):
    (tmp_path / "a_000000.wav").write_bytes(b"")  # found by name; never decoded here
    write_audiocaps_csv(tmp_path / "train.csv", [[1, "a", 0, "A dog barks"]])
    with pytest.raises(FileNotFoundError, match=r"test\.csv: AudioCaps needs test\.csv"):
        audiocaps.read_audiocaps(str(tmp_path))
    write_audiocaps_csv(tmp_path / "test.csv", [
        [2, "a", 0, "Birds chirp"],
        [2, "a", 0, "A duplicate id"],
        [3, "a", 0, ", ,"],  # no clause
        [4, "a", 0],  # a column short
    ])
    write_audiocaps_csv(tmp_path / "val.csv", [[5, "a", 0, "Rain falls"]])
    rows, skips = audiocaps.read_audiocaps(str(tmp_path), val_fraction=1.0)
    assert [(r.split, r.audiocap_id) for r in rows] == [("train", 1), ("val", 5), ("test", 2)]
    assert sorted((s.source.split(" ")[0], s.reason.split(":")[0]) for s in skips) == [
        ("test.csv:3", "duplicate id"), ("test.csv:4", "caption without a clause"),
        ("test.csv:5", "malformed csv row")]
    with open(tmp_path / "val.csv", "w") as f:
        f.write("id,video,caption\n1,a,x\n")
    with pytest.raises(UserError, match=r"val\.csv: the first row .*\(missing audiocap_id"):
        audiocaps.read_audiocaps(str(tmp_path))


def test_audiocaps_decoding_skips(tmp_path, monkeypatch):
    short, silent, clip = (str(tmp_path / n) for n in ("short.wav", "silent.wav", "clip.wav"))
    sf.write(short, tone(0.5, SR, 220), SR)
    sf.write(silent, np.zeros(2 * SR, np.float32), SR)
    sf.write(clip, tone(2.0, SR, 220), SR)
    with pytest.raises(media.SkipClip, match=r"audio too short: 8000 samples \(0.50 s\) < 1 s"):
        audiocaps.load_clip_audio(short)
    with pytest.raises(media.SkipClip, match="silent audio"):
        audiocaps.load_clip_audio(silent)
    (tmp_path / "not_audio.wav").write_bytes(b"not a wav file")
    with pytest.raises(media.SkipClip, match="unreadable audio"):
        audiocaps.load_clip_audio(str(tmp_path / "not_audio.wav"))
    m4a = str(tmp_path / "clip.m4a")
    if shutil.which("ffmpeg"):  # the audio track through ffmpeg
        subprocess.run(["ffmpeg", "-v", "error", "-i", clip, "-c:a", "aac", m4a], check=True)
        waveform, _ = audiocaps.load_clip_audio(m4a, max_seconds=1.5)
        assert waveform.dtype == np.float32 and len(waveform) == int(1.5 * SR)
    else:
        (tmp_path / "clip.m4a").write_bytes(b"")
    monkeypatch.setattr(media.shutil, "which", lambda tool: None)
    with pytest.raises(media.SkipClip, match=r"ffmpeg not found: decoding \.m4a files needs"):
        audiocaps.load_clip_audio(m4a)
