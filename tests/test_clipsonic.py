"""The CLIPSonic family through the generic machinery: training on generated data, the
denoising-loss evaluation, and one train step on 1 vs 8 devices."""

import json

import jax
import numpy as np
import pytest
from test_sharding import global_relative_difference

from clipsep_jax import checkpoints, evaluate, sharding, train
from clipsep_jax.config import default_config, validate
from clipsep_jax.train import make_optimizer, sharded_train_state, sharded_train_step


def tiny_clipsonic(data_dir="", **train_overrides):
    config = default_config("clipsonic")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.model.widths = (16, 32)
    config.model.blocks_per_level = 1
    config.model.embedding_dim = 32
    config.model.condition_dim = 40  # the tests' tiny CLIP
    config.clipsonic.mel.n_mels = 32
    config.audio.crop_samples = 16383  # 64 mel frames
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.lr_warmup_steps = 5
    config.train.ema_decay = 0.0
    config.train.log_every_steps = 1
    config.train.validation_every_steps = 1000
    config.mesh.fsdp_min_size = 64
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def test_config_is_checked():
    config = tiny_clipsonic()
    validate(config)
    config.audio.crop_samples = 16000  # 63 frames: not halvable
    with pytest.raises(ValueError, match="config.audio.crop_samples=16000 gives 63 mel frames"):
        validate(config)


def test_training_and_the_denoising_evaluation(generated_dataset, tmp_path):
    config = tiny_clipsonic(generated_dataset, num_steps=60, checkpoint_every_steps=60)
    checkpoints.write_config(tmp_path, config)
    train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "train_log.jsonl") as f:
        losses = [record["loss"] for record in map(json.loads, f) if "loss" in record]
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    config.eval.split = "val"
    report, path = evaluate.run(config, str(tmp_path), "latest", progress=False)
    assert report["rows"][0]["count"] == 8 and np.isfinite(report["rows"][0]["loss"])
    assert sum(row["count"] for row in report["rows"][1:]) == 8
    assert "| all | 8 |" in path.with_suffix(".md").read_text()


def run_steps(config, devices):
    mesh = sharding.make_mesh(config, devices)
    optimizer = make_optimizer(config)
    state, shardings = sharded_train_state(config, jax.random.PRNGKey(0), optimizer, mesh)
    step = sharded_train_step(config, optimizer, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {"waveform": rng.normal(0, 0.1, (8, 16383)).astype(np.float32),
             "condition": rng.normal(size=(8, 40)).astype(np.float32)}
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    return state, float(metrics["loss"])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 emulated devices")
def test_eight_devices_match_one():
    config = tiny_clipsonic()
    one_state, one_loss = run_steps(config, jax.devices()[:1])
    config.mesh.data, config.mesh.fsdp = 4, 2
    state, loss = run_steps(config, jax.devices()[:8])
    assert loss == pytest.approx(one_loss, rel=1e-5)
    assert global_relative_difference(state.params, one_state.params) <= 1e-5
