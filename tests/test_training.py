"""The training loop on a generated dataset: learning, exact resume after SIGKILL, NaN stop."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import tiny_hf_config
from media_trees import SR, tone

from clipsep_jax import input_pipeline, train
from clipsep_jax.clip import CLIP, config_from_transformers
from clipsep_jax.config import default_config
from data_prep import build

ROOT = Path(__file__).resolve().parents[1]


def write_class_frames(folder: Path, count: int, label: str, seed: int) -> None:
    """Frames whose colour says the class (so the query carries the source's identity)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = np.array([220, 60, 40] if label == "accordion" else [40, 80, 220], np.float32)
    for i in range(1, count + 1):
        image = np.clip(colour + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=95)


def clean_tree(root: Path, per_split=(8, 8, 4), seconds=6.0) -> None:
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        rows = []
        for i in range(count):
            label = ("accordion", "tuba")[i % 2]
            name = f"{split}{i}"
            audio_path = root / "audio" / label / f"{name}.wav"
            audio_path.parent.mkdir(parents=True, exist_ok=True)
            frequency = (220 if label == "accordion" else 70) * (1 + 0.1 * i)
            sf.write(audio_path, tone(seconds, SR, frequency, seed=i), SR)
            write_class_frames(root / "frames" / label / name, int(seconds), label, seed=i)
            rows.append([str(audio_path), str(root / "frames" / label / name), str(int(seconds))])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_in")
    clean_tree(root)
    clip_dir = tmp_path_factory.mktemp("clip") / "clip"
    CLIP.random(config_from_transformers(tiny_hf_config())).save_pretrained(str(clip_dir))
    out = tmp_path_factory.mktemp("train_data")
    build.run(["--dataset=music", f"--manual_dir={root}", f"--data_dir={out}",
               f"--clip={clip_dir}", "--min_samples=16383"])
    return str(out)


def tiny_config(data_dir: str, **train_overrides):
    config = default_config()
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.model.num_downs = 5
    config.model.base_width = 8
    config.model.num_mask_channels = 4
    config.model.query_dim = 40
    config.audio.crop_samples = 16383  # 64 STFT frames
    config.query.frame_margin_seconds = 2.0
    config.train.batch_size = 8  # one example per emulated device in-process
    config.train.lr_warmup_steps = 10
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 10
    config.train.validation_every_steps = 1000
    config.train.validation_sdr_examples = 4
    config.train.num_summary_examples = 1
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def read_log(workdir) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the restart) keeps the last."""
    losses = {}
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def test_training_loss_falls_and_writes_logs(dataset_dir, tmp_path, monkeypatch):
    config = tiny_config(dataset_dir, num_steps=200, checkpoint_every_steps=100,
                         learning_rate=3e-3)
    train.train_and_evaluate(config, str(tmp_path))
    losses = read_log(tmp_path)
    values = np.array([losses[s] for s in range(1, 201)])
    assert values[-30:].mean() < 0.9 * values[:30].mean(), values[::20]
    assert (tmp_path / "checkpoints" / "200").is_dir()
    assert any(name.startswith("events.out") for name in os.listdir(tmp_path / "logs"))


def run_main(workdir, *overrides, wait=True):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device in the subprocess
    command = [sys.executable, "-m", "clipsep_jax.main",
               f"--config={ROOT / 'configs' / 'music_clipsep.py'}", f"--workdir={workdir}",
               *overrides]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = process.communicate(timeout=600)
        return process.returncode, output
    return process


def overrides(data_dir, steps):
    config = tiny_config(data_dir, num_steps=steps)
    flat = []
    for group in ("data", "model", "audio", "query", "train", "mesh"):
        for key, value in config[group].items():
            if value != default_config()[group][key]:
                flat.append(f"--config.{group}.{key}={value}")
    return flat


def test_sigkill_after_a_checkpoint_resumes_with_the_same_losses(dataset_dir, tmp_path):
    args = overrides(dataset_dir, 30)
    code, output = run_main(tmp_path / "straight", *args)
    assert code == 0, output
    straight = read_log(tmp_path / "straight")

    process = run_main(tmp_path / "killed", *args, wait=False)
    checkpoint = tmp_path / "killed" / "checkpoints" / "10"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_dir()
    code, output = run_main(tmp_path / "killed", *args)
    assert code == 0, output
    assert "resumed from step" in output
    resumed = read_log(tmp_path / "killed")
    steps = list(range(11, 31))
    np.testing.assert_array_equal([resumed[s] for s in steps], [straight[s] for s in steps])


def test_nan_in_a_batch_stops_with_the_last_good_checkpoint(dataset_dir, tmp_path, monkeypatch):
    config = tiny_config(dataset_dir, num_steps=30)
    calls = {"n": 0}
    original = input_pipeline.model_batch

    def poisoned(config_, batch):
        calls["n"] += 1
        out = original(config_, batch)
        if calls["n"] == 15:
            out = dict(out, mag_mix=np.full_like(out["mag_mix"], np.nan))
        return out

    monkeypatch.setattr(input_pipeline, "model_batch", poisoned)
    with pytest.raises(train.NonFiniteLossError, match="at step 15.*last good checkpoint is "
                                                         "step 10"):
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.setattr(input_pipeline, "model_batch", original)
    # The checkpoint is intact: a restart resumes from it and finishes.
    config.train.num_steps = 12
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 12
    assert all(np.isfinite(np.asarray(x)).all() for x in
               __import__("jax").tree_util.tree_leaves(state.params))


def test_sigterm_saves_a_checkpoint_and_stops(dataset_dir, tmp_path, monkeypatch):
    config = tiny_config(dataset_dir, num_steps=30)
    calls = {"n": 0}
    original = input_pipeline.model_batch

    def preempted(config_, batch):
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(config_, batch)

    monkeypatch.setattr(input_pipeline, "model_batch", preempted)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 13
    assert (tmp_path / "checkpoints" / "13").is_dir()


def test_keeps_the_latest_and_the_best_checkpoint(dataset_dir, tmp_path, monkeypatch):
    config = tiny_config(dataset_dir, num_steps=20, validation_every_steps=5,
                         checkpoint_every_steps=5, keep_checkpoints=1)
    scripted = iter([0.5, 0.2, 0.9, 0.7])  # validation losses at steps 5, 10, 15, 20
    monkeypatch.setattr(train, "validate",
                        lambda *args: ({"validation_loss": next(scripted)}, {}))
    train.train_and_evaluate(config, str(tmp_path))
    kept = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {20, 10}
