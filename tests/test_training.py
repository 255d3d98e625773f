"""The training loop on a generated dataset: learning, exact resume after SIGKILL, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from generated_data import tiny_config

from clipsep_jax import input_pipeline, train
from clipsep_jax.config import default_config

ROOT = Path(__file__).resolve().parents[1]


def read_log(workdir) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the restart) keeps the last."""
    losses = {}
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def test_training_loss_falls_and_writes_logs(trained_workdir):
    """The session's trained model (250 steps, 8 emulated devices, generated data)."""
    losses = read_log(trained_workdir)
    values = np.array([losses[s] for s in range(1, 251)])
    assert values[-30:].mean() < 0.9 * values[:30].mean(), values[::25]
    with open(os.path.join(trained_workdir, "train_log.jsonl")) as f:
        validation = [r for r in map(json.loads, f) if "validation_sdr_image" in r][-1]
    assert validation["validation_sdr_image"] > validation["validation_sdr_mixture"] + 3.0
    assert os.path.isdir(os.path.join(trained_workdir, "checkpoints", "250"))
    assert any(name.startswith("events.out")
               for name in os.listdir(os.path.join(trained_workdir, "logs")))


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


def test_sigkill_after_a_checkpoint_resumes_with_the_same_losses(generated_dataset, tmp_path):
    args = overrides(generated_dataset, 30)
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


def test_nan_in_a_batch_stops_with_the_last_good_checkpoint(
    generated_dataset, tmp_path, monkeypatch
):
    config = tiny_config(generated_dataset, num_steps=30)
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


def test_sigterm_saves_a_checkpoint_and_stops(generated_dataset, tmp_path, monkeypatch):
    config = tiny_config(generated_dataset, num_steps=30)
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


def test_keeps_the_latest_and_the_best_checkpoint(generated_dataset, tmp_path, monkeypatch):
    config = tiny_config(generated_dataset, num_steps=20, validation_every_steps=5,
                         checkpoint_every_steps=5, keep_checkpoints=1)
    scripted = iter([0.5, 0.2, 0.9, 0.7])  # validation losses at steps 5, 10, 15, 20
    monkeypatch.setattr(train, "validate",
                        lambda *args: ({"validation_loss": next(scripted)}, {}))
    train.train_and_evaluate(config, str(tmp_path))
    kept = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {20, 10}
