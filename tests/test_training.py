"""The training loop on a generated dataset: learning, exact resume after SIGKILL, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
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


def run_main(workdir, *overrides, wait=True, devices=1, config="music_clipsep.py"):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device in the subprocess
    env.pop("CLIPSEP_DEBUG", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "clipsep_jax.main",
               f"--config={ROOT / 'configs' / config}", f"--workdir={workdir}",
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


def changed_fields(config, defaults, prefix="--config") -> list[str]:
    """``config``'s values that differ from ``defaults``, as command-line overrides."""
    flat = []
    for key, value in config.items():
        if hasattr(value, "items"):
            flat += changed_fields(value, defaults[key], f"{prefix}.{key}")
        elif value != defaults[key]:
            flat.append(f"{prefix}.{key}={value}")
    return flat


def kill_after_a_checkpoint_and_resume(tmp_path, args, config="music_clipsep.py",
                                       checkpoint_step=10, steps=30):
    """Trains straight; trains again, SIGKILLed as soon as checkpoint ``checkpoint_step`` exists,
    and resumes. Asserts the resumed run's losses equal the straight run's, bit for bit."""
    code, output = run_main(tmp_path / "straight", *args, config=config)
    assert code == 0, output
    straight = read_log(tmp_path / "straight")

    process = run_main(tmp_path / "killed", *args, wait=False, config=config)
    checkpoint = tmp_path / "killed" / "checkpoints" / str(checkpoint_step)
    deadline = time.time() + 300
    while not checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_dir()
    code, output = run_main(tmp_path / "killed", *args, config=config)
    assert code == 0, output
    assert f"resumed from step {checkpoint_step}" in output
    resumed = read_log(tmp_path / "killed")
    after = list(range(checkpoint_step + 1, steps + 1))
    np.testing.assert_array_equal([resumed[s] for s in after], [straight[s] for s in after])


def test_sigkill_after_a_checkpoint_resumes_with_the_same_losses(generated_dataset, tmp_path):
    kill_after_a_checkpoint_and_resume(tmp_path, overrides(generated_dataset, 30))


class WrappedBatches:
    """The training stream with ``change(n, batch)`` applied to the n-th batch (1-based)."""

    def __init__(self, batches, change):
        self.batches, self.change, self.count = batches, change, 0
        self.grain_iterator = batches.grain_iterator

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        return self.change(self.count, next(self.batches))


def wrap_training_batches(monkeypatch, change):
    original = input_pipeline.training_batches
    monkeypatch.setattr(input_pipeline, "training_batches",
                        lambda *a, **k: WrappedBatches(original(*a, **k), change))


def test_nan_in_a_batch_stops_with_the_last_good_checkpoint(
    generated_dataset, tmp_path, monkeypatch
):
    config = tiny_config(generated_dataset, num_steps=30)

    def poisoned(n, batch):
        if n == 15:
            mag = batch["mag_mix"]
            batch = dict(batch, mag_mix=jax.device_put(np.full(mag.shape, np.nan, mag.dtype),
                                                       mag.sharding))
        return batch

    wrap_training_batches(monkeypatch, poisoned)
    with pytest.raises(train.NonFiniteLossError, match="at step 15.*last good checkpoint is "
                                                         "step 10"):
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    # The checkpoint is intact: a restart resumes from it and finishes.
    config.train.num_steps = 12
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 12
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_sigterm_saves_a_checkpoint_and_stops(generated_dataset, tmp_path, monkeypatch):
    config = tiny_config(generated_dataset, num_steps=30)

    def preempted(n, batch):
        if n == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    wrap_training_batches(monkeypatch, preempted)
    with pytest.raises(train.Stopped, match="pre-empted .SIGTERM. at step 13: checkpoint saved"):
        train.train_and_evaluate(config, str(tmp_path))
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


def test_a_workdir_of_the_layout_before_the_family_redesign_loads_and_resumes(
    generated_dataset, tmp_path
):
    """Checkpoints saved batch_stats beside params (no rng, no EMA) and config.json had top-level
    loss / nit sections and query.clip_model; such a workdir still loads and resumes."""
    import grain
    import orbax.checkpoint as ocp

    from clipsep_jax import checkpoints, sharding

    config = tiny_config(generated_dataset, num_steps=10)
    new = tmp_path / "new"
    state = train.train_and_evaluate(config, str(new))

    old = tmp_path / "old"
    saved = json.loads((new / "config.json").read_text())
    family_section = saved.pop("clipsep")
    saved.update(loss=family_section["loss"], nit=family_section["nit"])
    saved["query"]["clip_model"] = saved["query"].pop("encoder_model")
    saved["query"].pop("encoder")
    old.mkdir()
    (old / "config.json").write_text(json.dumps(saved))
    source, metadata = input_pipeline.open_split(config.data, "train")
    mesh = sharding.make_mesh(config)
    family = train.get_family(config)
    batches = input_pipeline.training_batches(
        config, family.training_transform(config, source, metadata), len(source), mesh)
    legacy = {"step": state.step, "params": state.params,
              "batch_stats": state.model_state["batch_stats"], "opt_state": state.opt_state}
    manager = ocp.CheckpointManager(str(old / "checkpoints"), item_names=("state", "data"))
    manager.save(10, args=ocp.args.Composite(
        state=ocp.args.StandardSave(legacy),
        data=grain.checkpoint.CheckpointSave(batches.grain_iterator)))
    manager.wait_until_finished()
    manager.close()

    loaded_config, variables, step = checkpoints.load_workdir(old)
    assert step == 10 and loaded_config.clipsep.loss.weighted == config.clipsep.loss.weighted
    assert loaded_config.query.encoder_model == config.query.encoder_model
    _, expected, _ = checkpoints.load_workdir(new)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    loaded_config.train.num_steps = 12
    resumed = train.train_and_evaluate(loaded_config, str(old))
    assert int(resumed.step) == 12


def assert_one_line_error(output: str, *fragments: str) -> None:
    """A user error: 'error: ...' naming the value, no traceback."""
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_ordinary_mistakes_get_one_line_and_exit_code_2(generated_dataset, tmp_path):
    args = overrides(generated_dataset, 10)
    code, output = run_main(tmp_path / "a", *args, "--config.train.batchsize=8")
    assert code == 2
    assert_one_line_error(output, "--config", "batchsize", 'Did you mean "batch_size"')
    code, output = run_main(tmp_path / "b", *args, "--config.train.batch_size=12", devices=8)
    assert code == 2
    assert_one_line_error(output, "config.train.batch_size=12", "8 devices")
    code, output = run_main(tmp_path / "b", *args, "--config.train.batch_size=0")
    assert code == 2
    assert_one_line_error(output, "config.train.batch_size=0")
    code, output = run_main(tmp_path / "c", *args, f"--config.data.data_dir={tmp_path / 'none'}")
    assert code == 2 and len(output.splitlines()) < 15, output
    assert_one_line_error(output, "config.data.data_dir=", "no dataset 'music'")
    assert not any((tmp_path / d / "config.json").exists() for d in "abc")


def corrupt(step_folder) -> None:
    """Overwrites every file of a checkpoint's train state with garbage of the same size."""
    for path in (step_folder / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8 + 1))


def test_a_failed_resume_leaves_the_run_intact_and_a_corrupt_checkpoint_is_skipped(
    generated_dataset, tmp_path
):
    workdir = tmp_path / "run"
    args = overrides(generated_dataset, 20)
    code, output = run_main(workdir, *args)
    assert code == 0, output
    saved_config = (workdir / "config.json").read_bytes()
    log = (workdir / "train_log.jsonl").read_text()

    # Another model in the same workdir: explained field by field, nothing on disk changes.
    code, output = run_main(workdir, *args, "--config.model.base_width=4",
                            "--config.train.num_steps=30")
    assert code == 2
    assert_one_line_error(output, "another model", "model.base_width: 8 in the run, 4 given")
    assert (workdir / "config.json").read_bytes() == saved_config
    assert (workdir / "train_log.jsonl").read_text() == log
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "20"]

    # The newest checkpoint unreadable: reported, the one before used; the log keeps each step
    # once.
    corrupt(workdir / "checkpoints" / "20")
    code, output = run_main(workdir, *overrides(generated_dataset, 22))
    assert code == 0, output
    assert "checkpoint 20 cannot be read" in output and "resumed from step 10" in output
    assert (workdir / "checkpoints" / "20.unreadable").is_dir()  # kept, not deleted
    steps = [json.loads(line)["step"] for line in
             (workdir / "train_log.jsonl").read_text().splitlines()
             if "validation_loss" not in line]
    assert steps == list(range(1, 23)), steps


@pytest.mark.parametrize(("signal_number", "code", "word"), [
    (signal.SIGTERM, 143, "pre-empted"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_saves_and_stops_without_evaluating(generated_dataset, tmp_path,
                                                     signal_number, code, word):
    workdir = tmp_path / "run"
    process = run_main(workdir, *overrides(generated_dataset, 400),
                       "--config.eval.after_training=True", wait=False)
    log = workdir / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and (
            not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    sent = time.time()
    process.send_signal(signal_number)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == code, output[-3000:]
    assert time.time() - sent < 30
    assert word in output and "checkpoint saved" in output and "Traceback" not in output
    assert not (workdir / "evaluation").exists()
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 3
