"""The CLIPSonic family through the generic machinery: training on generated data, the
denoising-loss and generation evaluation, exact resume after SIGKILL, one train step on 1 vs 8
devices, generation from the command line and the web page."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_clipsonic
from PIL import Image
from test_sharding import global_relative_difference
from test_training import changed_fields, kill_after_a_checkpoint_and_resume

from clipsep_jax import evaluate, sharding
from clipsep_jax.config import default_config, validate
from clipsep_jax.encoders.clap import resample
from clipsep_jax.errors import UserError
from clipsep_jax.train import make_optimizer, sharded_train_state, sharded_train_step

REPO = Path(__file__).resolve().parents[1]


def test_config_is_checked():
    config = tiny_clipsonic()
    validate(config)
    config.clipsonic.prior.kind = "diffusion"
    with pytest.raises(ValueError, match="config.clipsonic.prior.kind='diffusion'"):
        validate(config)
    config.clipsonic.prior.kind, config.clipsonic.prior.split = "ridge", "train"
    with pytest.raises(ValueError, match="the generator's training split"):
        validate(config)
    config.clipsonic.prior.kind = ""
    config.audio.crop_samples = 16000  # 63 frames: not halvable
    with pytest.raises(ValueError, match="config.audio.crop_samples=16000 gives 63 mel frames"):
        validate(config)


def test_training_and_the_denoising_evaluation(trained_clipsonic):
    config, tmp_path = trained_clipsonic
    with open(tmp_path / "train_log.jsonl") as f:
        losses = [record["loss"] for record in map(json.loads, f) if "loss" in record]
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    config.eval.split = "val"
    # The generated tones are two classes a small classifier learns at once.
    config.clipsonic.eval.classifier_steps, config.clipsonic.eval.steps = 150, 4
    config.clipsonic.eval.guidance = "0,2"
    config.clipsonic.prior.kind, config.clipsonic.prior.split = "ridge", "test"
    config.eval.num_audio_examples = 2
    report, path = evaluate.run(config, str(tmp_path), "latest", progress=False)
    assert report["rows"][0]["count"] == 8 and np.isfinite(report["rows"][0]["loss"])
    assert sum(row["count"] for row in report["rows"][1:]) == 8
    table = path.with_suffix(".md").read_text()
    assert "| all | 8 |" in table
    assert report["classifier"]["test_accuracy"] >= 0.95, report["classifier"]
    rows = {(r["mode"], r["guidance"]): r for r in report["generation"]}
    assert set(rows) == {(mode, w) for mode in ("image", "text_zs", "text_pd") for w in (0, 2)}
    for row in rows.values():
        assert row["count"] == 8 and 0 <= row["relevance_mel"] <= 1
        assert np.isfinite(row["frechet_mel"]) and np.isfinite(row["frechet_waveform"])
    assert report["floor"]["frechet_distance"] >= 0
    assert "| image (IQ) | 2 | 8 |" in table and "floor (real training vs real test" in table
    assert "| text (PD) | 2 | 8 |" in table and "ridge prior fitted on the test split" in table
    assert len(report["audio_examples"]) == 2  # the first two labels as text queries
    for folder in map(Path, report["audio_examples"]):
        for mode in ("text_zs", "text_pd"):
            wave, rate = sf.read(folder / f"{mode}.wav")
            assert rate == 16000 and wave.shape == (16383,) and np.abs(wave).max() > 0
            assert (folder / f"{mode}.png").is_file()
    config.eval.num_audio_examples = 0
    # the cached classifier is reused: the same accuracy without training again
    again, _ = evaluate.run(config, str(tmp_path), "latest", progress=False)
    assert again["classifier"] == report["classifier"]


def test_sigkill_after_a_checkpoint_resumes_with_the_same_losses(generated_dataset, tmp_path):
    """python -m clipsep_jax.main with configs/music_clipsonic.py and the tiny model's fields."""
    config = tiny_clipsonic(generated_dataset, num_steps=20, checkpoint_every_steps=10,
                            lr_schedule="constant")
    args = changed_fields(config, default_config("clipsonic"))
    kill_after_a_checkpoint_and_resume(tmp_path, args, "music_clipsonic.py", steps=20)


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


def test_generate_command_writes_samples(trained_clipsonic, tmp_path):
    _, workdir = trained_clipsonic
    frame = tmp_path / "frame.png"
    Image.fromarray(np.full((64, 64, 3), (220, 60, 40), np.uint8)).save(frame)
    command = [sys.executable, "-m", "clipsep_jax.generate", f"--workdir={workdir}",
               "--text=accordion", f"--image={frame}", "--num_samples=2", "--seconds=1",
               "--steps=4", "--prior=ridge", "--prior_split=test",
               f"--output-dir={tmp_path / 'out'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Griffin-Lim" in result.stdout
    for name in ("accordion_0", "accordion_1", "image_frame_0", "image_frame_1"):
        wave, rate = sf.read(tmp_path / "out" / f"{name}.wav")
        assert rate == 16000 and wave.shape == (16000,) and np.isfinite(wave).all()
        assert np.abs(wave).max() > 0 and (tmp_path / "out" / f"{name}.png").is_file()
    first, _ = sf.read(tmp_path / "out" / "accordion_0.wav")
    second, _ = sf.read(tmp_path / "out" / "accordion_1.wav")
    assert not np.allclose(first, second)  # two samples, two noises
    manifest = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert manifest["waveforms"].startswith("Griffin-Lim")
    assert manifest["prior"].startswith("ridge prior fitted on the test split")
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_guidance_changes_what_the_model_generates(trained_clipsonic):
    from clipsep_jax.families.clipsonic.generator import Generator

    config, workdir = trained_clipsonic
    generator = Generator.from_checkpoint(str(workdir))
    kwargs = dict(num_samples=1, seconds=0.5, steps=4, seed=3)
    conditional = generator.generate(["tuba"], guidance=1.0, **kwargs)[0]["mels"]
    unconditional = generator.generate(["tuba"], guidance=0.0, **kwargs)[0]["mels"]
    other = generator.generate(["accordion"], guidance=0.0, **kwargs)[0]["mels"]
    assert conditional.shape == (1, 32, 34)  # 0.5 s: 33 frames, rounded up to even
    np.testing.assert_allclose(unconditional, other, atol=1e-5)  # w = 0 ignores the query
    assert not np.allclose(conditional, unconditional)
    zero_shot = generator.embed_queries(["tuba"])
    assert generator.use_prior("retrieval", "test").startswith("retrieval prior fitted on the test")
    through_prior = generator.embed_queries(["tuba"])
    assert not np.allclose(zero_shot, through_prior)
    with pytest.raises(UserError, match="training split"):
        generator.use_prior("ridge", config.data.train_split)
    with pytest.raises(UserError, match="prior 'dalle': expected one of ridge"):
        generator.use_prior("dalle")
    with pytest.raises(UserError, match="the diffusion prior needs a checkpoint"):
        generator.use_prior("diffusion")


def test_the_web_page_generates(trained_clipsonic, tmp_path):
    """The generation page's logic (its Gradio layout is a thin shell over it), and the page
    itself served for a generator run."""
    from clipsep_jax.app import GenerationPage, build_generation_app
    from clipsep_jax.families.clipsonic.generator import Generator
    from clipsep_jax.separation import SeparationError

    _, workdir = trained_clipsonic
    page = GenerationPage(Generator.from_checkpoint(str(workdir)), tmp_path)
    result = page.run("tuba", None, 2.0, 2, 5, seconds=0.5, steps=3)
    assert [Path(f).name for f in result["files"]] == ["tuba_0.wav", "tuba_1.wav"]
    wave, rate = sf.read(result["files"][0])
    assert rate == 16000 and wave.shape == (8000,) and np.abs(wave).max() > 0
    assert len(result["pictures"]) == 2 and Path(result["pictures"][0][0]).is_file()
    frame = tmp_path / "frame.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(frame)
    assert page.run("", str(frame), 1.0, 1, 0, seconds=0.5, steps=3)["query"] == "image_frame"
    with pytest.raises(SeparationError, match="no query"):
        page.run(" ", None, 1.0, 1, 0)
    with pytest.raises(SeparationError, match="not both"):
        page.run("tuba", str(frame), 1.0, 1, 0)
    (tmp_path / "bad.png").write_text("no picture")
    with pytest.raises(SeparationError, match="bad.png: cannot read the image"):
        page.run("", str(tmp_path / "bad.png"), 1.0, 1, 0)
    assert build_generation_app(page, "t") is not None


def test_the_generator_uses_a_hifigan_vocoder(trained_clipsonic, tmp_path):
    from test_vocoder import OLD_NORM, ReferenceGenerator, randomise

    from clipsep_jax.families.clipsonic.generator import Generator

    _, workdir = trained_clipsonic
    layout = {"resblock": "1", "upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8],
              "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
              "resblock_dilation_sizes": [[1, 3]]}
    reference = ReferenceGenerator(layout, 32, OLD_NORM).eval()  # the tiny model's 32 bands
    randomise(reference, 4)
    mel_settings = {"sampling_rate": 16000, "num_mels": 32, "hop_size": 256, "n_fft": 1024,
                    "win_size": 1024, "fmin": 0, "fmax": 8000}
    (tmp_path / "config.json").write_text(json.dumps({**layout, **mel_settings}))
    torch.save({"generator": reference.state_dict()}, tmp_path / "g_1")
    generator = Generator.from_checkpoint(str(workdir))
    assert generator.use_vocoder(str(tmp_path / "g_1")).startswith("HiFi-GAN")
    result = generator.generate(["tuba"], num_samples=1, seconds=0.5, steps=4, seed=3)[0]
    with torch.no_grad():
        expected = reference(torch.from_numpy(result["mels"])).numpy()[:, 0, :8000]
    np.testing.assert_allclose(result["waveforms"], expected, atol=1e-4)
    (tmp_path / "nyquist.json").write_text(json.dumps({**layout, **mel_settings, "fmax": None}))
    generator.use_vocoder(str(tmp_path / "g_1"), str(tmp_path / "nyquist.json"))  # null: 8 kHz
    # a 22.05 kHz vocoder of the same bands: log-mels interpolated to its frame rate, its
    # waveform resampled to 16 kHz
    (tmp_path / "22k.json").write_text(json.dumps({**layout, **mel_settings,
                                                   "sampling_rate": 22050}))
    generator.use_vocoder(str(tmp_path / "g_1"), str(tmp_path / "22k.json"))
    resampled = generator.generate(["tuba"], num_samples=1, seconds=0.5, steps=4, seed=3)[0]
    mels = result["mels"][0]  # [32, T] at 62.5 frames/s
    step = (256 / 22050) * (16000 / 256)
    position = np.arange(int((mels.shape[-1] - 1) / step) + 1) * step
    interpolated = np.stack([np.interp(position, np.arange(mels.shape[-1]), band)
                             for band in mels])
    with torch.no_grad():
        wave22k = reference(torch.from_numpy(interpolated[None].astype(np.float32))).numpy()
    expected = np.asarray(resample(wave22k[:, 0], 22050, 16000))[:, :8000]
    assert resampled["waveforms"].shape == (1, 8000)
    np.testing.assert_allclose(resampled["waveforms"], expected,
                               atol=1e-4 * np.abs(expected).max())
    (tmp_path / "other.json").write_text(json.dumps({**layout, **mel_settings, "num_mels": 80}))
    with pytest.raises(UserError, match="'num_mels': \\(80, 32\\)"):
        generator.use_vocoder(str(tmp_path / "g_1"), str(tmp_path / "other.json"))
