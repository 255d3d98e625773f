"""Evaluation: metric backends, test mixtures as the reference builds them, the evaluation table
of a trained tiny model, and a converted reference checkpoint scored as the reference would."""

import json
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal
import scipy.stats
import torch
import torch.nn.functional as F
import torch_reference as tr
from generated_data import tiny_config

from clipsep_jax import bss_eval, evaluate
from clipsep_jax.checkpoints import load_config
from clipsep_jax.families.clipsep import evaluation
from clipsep_jax.input_pipeline import open_split

REPO = Path(__file__).resolve().parents[1]


def generated_signals(case: int, length: int = 32000):
    """References [2, L] and estimates [2, L] of several kinds: leakage, filtering, noise."""
    rng = np.random.default_rng(case)
    t = np.arange(length) / 16000
    tone = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k
               for k, f in enumerate(rng.uniform(100, 2000, 4), 1))
    references = np.stack([0.3 * tone * (1 + 0.5 * np.sin(2 * np.pi * 2 * t)),
                           0.2 * rng.standard_normal(length)])
    leak = rng.uniform(0.05, 0.6)
    filtered = scipy.signal.lfilter(rng.normal(0, 0.3, 16) + np.eye(16)[0], 1, references, axis=1)
    estimates = ((1 - leak) * (filtered if case % 2 else references) + leak * references[::-1]
                 + rng.uniform(0.001, 0.05) * rng.standard_normal((2, length)))
    return references, estimates


@pytest.mark.parametrize("definition", bss_eval.DEFINITIONS)
def test_fast_metrics_agree_with_the_libraries(definition):
    worst = max(bss_eval.agreement(*generated_signals(case), definition) for case in range(6))
    assert worst < 0.05, worst


def test_museval_sdr_is_the_plain_ratio_and_summaries():
    references, estimates = generated_signals(1)
    slow = bss_eval.source_metrics(references, estimates, "museval", fast=False)
    plain = 10 * np.log10((references**2).sum(1) / ((references - estimates) ** 2).sum(1))
    np.testing.assert_allclose(slow["sdr"], plain, atol=1e-6)
    v3 = bss_eval.source_metrics(references, estimates, "mir_eval", fast=False)
    assert np.all(v3["sdr"] > slow["sdr"])  # v3 forgives the filtering, v4 does not
    values = [1.0, 2.0, 4.0, 7.0]
    s = bss_eval.summarise(values)
    low, high = scipy.stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert s["count"] == 4 and s["median"] == 3.0
    assert s["ci95"] == pytest.approx((high - low) / 2)


def test_silent_signals_are_skipped_with_a_reason():
    references, estimates = generated_signals(0)
    mixture = references.sum(0)
    scores = bss_eval.score_example(3, references, np.stack([estimates, estimates * 0]),
                                    mixture, "museval", True)
    assert scores.candidates[0] is not None and scores.candidates[1] is None
    assert "silent" in scores.skipped[0]
    scores = bss_eval.score_example(4, references * [[1], [0]], estimates[None], mixture,
                                    "museval", True)
    assert scores.mixture is None and "reference [1] is silent" in scores.skipped[0]


def eval_config(dataset: str, **eval_overrides):
    config = tiny_config(dataset)
    for key, value in eval_overrides.items():
        setattr(config.eval, key, value)
    return config


def crop(waveform, start, length):
    out = np.zeros(length, np.float32)
    lo, hi = max(start, 0), min(start + length, len(waveform))
    out[lo - start: hi - start] = waveform[lo:hi]
    return out


@pytest.mark.parametrize("num_sources", [2, 3])
def test_test_mixtures_follow_the_reference(generated_dataset, num_sources):
    config = eval_config(generated_dataset, num_sources=num_sources, interference_split="val")
    test, metadata = open_split(config.data, "test")
    val, _ = open_split(config.data, "val")
    examples = evaluation.test_mixtures(config, test, metadata, val)
    again = evaluation.test_mixtures(config, test, metadata, val)
    assert len(examples) == len(test)
    for i in range(len(examples)):
        e = examples[i]
        np.testing.assert_array_equal(e["mag_mix"], again[i]["mag_mix"])
        assert len(e["partners"]) == num_sources - 1
        # The queried clip's middle-frame crop, halved; the interferers' crops averaged, halved.
        frames = len(test[i]["frame_embeddings"])
        start = int((frames // 2 - 0.5) * 16000) - config.audio.crop_samples // 2
        start = int(round(start / 256)) * 256
        np.testing.assert_allclose(
            e["waveforms"][0], crop(test[i]["waveform"], start, config.audio.crop_samples) / 2,
            atol=1e-6)
        others = [crop(val[int(p)]["waveform"], start, config.audio.crop_samples)
                  for p in e["partners"]]
        np.testing.assert_allclose(e["waveforms"][1], np.mean(others, 0) / 2, atol=1e-6)
        # The mixture's STFT is the sum of the two's.
        stft = e["mix_stft"][..., 0] + 1j * e["mix_stft"][..., 1]
        inverse = librosa.istft(stft, hop_length=256, length=config.audio.crop_samples)
        inner = slice(1024, -1024)
        np.testing.assert_allclose(inverse[inner], e["waveforms"].sum(0)[inner], atol=1e-5)
    assert not np.array_equal(examples[0]["partners"], examples[1]["partners"]) or \
        not np.array_equal(examples[1]["partners"], examples[2]["partners"])


def test_evaluation_table_of_the_trained_model(trained_workdir, generated_dataset):
    config = load_config(trained_workdir)
    # The generated splits repeat each other's tones, so mixtures are drawn within one split.
    config.eval.split = "val"
    config.eval.num_workers = 2  # the metric worker processes
    config.eval.batch_size = 3  # a padded last batch
    report, path = evaluate.run(config, trained_workdir, "best", progress=False)
    assert path.name == "val_2src_step250.json"
    assert path.exists() and path.with_suffix(".md").exists()
    assert json.loads(path.read_text())["rows"] == report["rows"]
    rows = {r["query"]: r for r in report["rows"]}
    assert set(rows) == {"mixture", "image", "text", "text_ensemble"}
    for row in rows.values():  # a silent estimate is left out (as the reference does), counted
        assert row["sdr"]["count"] + row["skipped"] == 8
        assert len(report["per_example"][row["query"]]) == row["sdr"]["count"]
    assert rows["mixture"]["sdr"]["count"] == 8
    assert rows["image"]["sdr"]["mean"] > rows["mixture"]["sdr"]["mean"] + 3
    assert report["metric_agreement_db"]["checked_examples"] >= 6
    assert report["metric_agreement_db"]["max_abs_difference"] < 0.05
    table = path.with_suffix(".md").read_text()
    assert "| image | - |" in table and "mixture (baseline)" in table
    print(table)


def test_evaluate_command_with_more_sources(trained_workdir):
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.evaluate", f"--workdir={trained_workdir}",
         f"--config={REPO / 'configs/from_workdir.py'}:{trained_workdir}",
         "--config.eval.num_sources=3", "--config.eval.query_modes=image",
         "--config.eval.num_workers=0", "--checkpoint=latest"],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| image | - |" in result.stdout
    assert "of 3 sources" in result.stdout
    out = Path(trained_workdir) / "evaluation" / "test_3src_step250.json"
    assert json.loads(out.read_text())["num_sources"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.evaluate", f"--workdir={trained_workdir}",
         "--checkpoint=7"], capture_output=True, text=True, check=False, cwd=REPO)
    assert bad.returncode == 2 and "no checkpoint at step 7" in bad.stderr


def reference_scores(model, example, mode_embeddings, use_noise_heads):
    """The reference's evaluation of one test mixture in PyTorch + librosa + museval: SDR of
    the queried source per candidate mask."""
    stft = example["mix_stft"][..., 0] + 1j * example["mix_stft"][..., 1]
    mag = torch.from_numpy(np.abs(stft).astype(np.float32))[None, None]
    query = torch.from_numpy(mode_embeddings)[None]
    with torch.no_grad():
        _, out = model(mag, [mag, mag], [query, query])
    z = torch.sigmoid(out["query_logits"][0])
    masks = [z]
    if use_noise_heads:
        masks += [torch.clamp(z + torch.sigmoid(n), max=1) for n in out["noise_logits"]]
    grid = tr.reference_grid(1, 513, mag.shape[-1], warp=False)
    length = (mag.shape[-1] - 1) * 256
    references = example["waveforms"][:, :length]
    sdrs = []
    for m in masks:
        estimates = []
        for mm in (m, 1 - m):
            linear = F.grid_sample(mm, grid, align_corners=True)[0, 0].numpy()
            binary = (linear > 0.5).astype(np.float32)
            wave = librosa.istft(np.abs(stft) * binary * np.exp(1j * np.angle(stft)),
                                 hop_length=256, win_length=1024)
            estimates.append(np.clip(wave, -1, 1))
        if any(np.abs(x).sum() <= 1e-5 for x in estimates):
            sdrs.append(None)  # the reference skips such an example
            continue
        values = bss_eval.source_metrics(references, np.stack(estimates), "museval", fast=False)
        sdrs.append(values["sdr"][0])
    return sdrs


def test_converted_reference_checkpoint_scores_as_the_reference(generated_dataset, tmp_path):
    torch.manual_seed(0)
    model = tr.CLIPSepNIT(layers=5, ngf=8, channels=4, query_dim=40)
    with torch.no_grad():  # weights large enough that masks are decided well away from 0.5
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.5 if "sound_net" in name else 3.0)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "best_model.pt")
    config = eval_config(generated_dataset, query_modes="image", num_workers=0)
    report, path = evaluate.run(config, str(tmp_path), str(tmp_path / "best_model.pt"),
                                model_kind="clipsep_nit", progress=False)
    assert path.name == "test_2src_best_model.json"
    config.audio.crop_samples = 65535  # a reference checkpoint brings the reference's audio
    test, metadata = open_split(config.data, "test")
    examples = evaluation.test_mixtures(config, test, metadata)
    ours = {k: {x["index"]: x["sdr"] for x in v} for k, v in report["per_example"].items()}
    compared = 0
    for i in range(len(examples)):
        expected = reference_scores(model, examples[i], examples[i]["image_queries"], True)
        if i in ours["image/without noise heads"]:
            assert ours["image/without noise heads"][i] == pytest.approx(expected[0], abs=0.05)
            compared += 1
        if i in ours["image/with noise heads (oracle)"]:
            assert ours["image/with noise heads (oracle)"][i] == pytest.approx(
                max(expected[1:]), abs=0.05)
            compared += 1
    assert compared >= 4
