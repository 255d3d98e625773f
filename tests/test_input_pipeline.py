"""Mix-and-separate examples against a direct time-domain rendition; determinism and resume."""

import grain
import jax
import numpy as np
import pytest

from clipsep_jax import audio, input_pipeline, sharding
from clipsep_jax.config import default_config
from clipsep_jax.families.clipsep.data import (
    MixSettings,
    ValidationMixer,
    crop_start,
    mix_sources,
    model_inputs,
    partner_indices,
)

LABELS = ["accordion", "tuba", "violin"]


def synthetic_records(count=6, seconds=10.0, seed=0, loud=()):
    """Clip records as data_prep writes them (stored STFT of the whole waveform)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        amplitude = 0.95 if i in loud else 0.3
        wave = amplitude * np.sin(2 * np.pi * (150 + 40 * i) * t) * (0.6 + 0.4 * np.sin(t))
        wave = (wave + 0.01 * rng.standard_normal(n)).astype(np.float32)
        stft = np.asarray(audio.stft(wave)).T
        records.append(
            {
                "id": f"clip{i}".encode(),
                "label": LABELS[i % 3].encode(),
                "waveform": wave,
                "stft": np.stack([stft.real, stft.imag], -1).astype(np.float32),
                "frame_embeddings": rng.normal(size=(int(seconds), 8)).astype(np.float16),
                "text_embedding": rng.normal(size=8).astype(np.float32),
            }
        )
    return records


METADATA = {
    "labels": LABELS,
    "sample_rate": 16000,
    "n_fft": 1024,
    "hop_length": 256,
    "win_length": 1024,
    "fps": 1.0,
}


def training_dataset(config, records, metadata, seed=None, process_index=0, process_count=1):
    """The generic training stream around a transform that keeps every mixed key."""
    settings = MixSettings.from_config(config, metadata)

    def transform(index, rng):
        others = partner_indices(index, len(records), settings.num_sources - 1, rng)
        return mix_sources([records[i] for i in [index, *others]], settings, rng)

    return input_pipeline.training_dataset(
        transform, len(records), batch_size=config.train.batch_size,
        seed=config.train.seed if seed is None else seed, process_index=process_index,
        process_count=process_count, num_workers=config.data.num_workers)


def evaluation_dataset(config, records, metadata, limit=0):
    mixer = ValidationMixer(config, records, metadata, seed=0)
    return grain.MapDataset.range(limit or len(records)).map(mixer)


def config_for(batch_size=4, workers=0):
    config = default_config()
    config.train.batch_size = batch_size
    config.data.num_workers = workers
    return config


class RecordingGenerator:
    """Wraps a Generator to remember the draws mix_sources makes (centres, gains)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.draws = []

    def integers(self, *args, **kwargs):
        value = self.rng.integers(*args, **kwargs)
        self.draws.append(("centre", int(value)))
        return value

    def uniform(self, *args, **kwargs):
        value = self.rng.uniform(*args, **kwargs)
        self.draws.append(("gain", float(value)))
        return value


def time_domain_example(records, draws, settings):
    """The reference's recipe: crop, gain, clip, / N, STFT each source, sum the spectra."""
    n = len(records)
    spectra = []
    centres = [v for k, v in draws if k == "centre"]
    gains = [v for k, v in draws if k == "gain"]
    for record, centre, gain in zip(records, centres, gains, strict=True):
        first = int(round(crop_start(centre, settings) / settings.hop_length))
        crop = record["waveform"][first * 256 : first * 256 + settings.crop_samples]
        crop = np.clip(gain * crop, -1, 1) / n
        spectra.append(audio.stft_numpy(crop))
    spectra = np.stack(spectra)
    return np.abs(spectra.sum(0)), np.abs(spectra)


@pytest.mark.parametrize("loud", [(), (0,)])
def test_training_example_equals_the_time_domain_mix(loud):
    records = synthetic_records(loud=loud)[:2]
    config = config_for()
    if loud:  # gains that certainly push the loud clip past 1
        config.audio.gain_min = 1.2
    settings = MixSettings.from_config(config, METADATA)
    rng = RecordingGenerator(3)
    example = mix_sources(records, settings, rng)
    want_mix, want_mags = time_domain_example(records, rng.draws, settings)
    assert example["mag_mix"].shape == (513, 256) and example["mags"].shape == (2, 513, 256)
    # Inside the crop the slice of the stored STFT is the crop's STFT; the two frames at each end
    # see the neighbouring audio instead of the crop's reflection.
    inner = slice(2, -2)
    scale = want_mags.max()
    assert np.abs(example["mags"][..., inner] - want_mags[..., inner]).max() <= 1e-5 * scale
    assert np.abs(example["mag_mix"][:, inner] - want_mix[:, inner]).max() <= 1e-5 * scale
    if loud:  # the clipped source is computed from its clipped waveform: equal everywhere
        assert np.abs(example["mags"][0] - want_mags[0]).max() <= 1e-5 * scale
        assert example["mags"][0].max() < records[0]["stft"].max() * 1.5 / 2
    centres = [v for k, v in rng.draws if k == "centre"]
    assert all(4 <= c <= 7 for c in centres)  # margin of 3 frames in a 10-frame clip
    np.testing.assert_allclose(
        example["image_queries"][0],
        records[0]["frame_embeddings"][centres[0] - 2 : centres[0] + 1].astype(np.float32).mean(0),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(example["text_queries"][1], records[1]["text_embedding"])
    assert list(example["labels"]) == [0, 1]


def test_evaluation_example_uses_the_middle_frame_and_no_gain():
    records = synthetic_records()
    settings = MixSettings.from_config(config_for(), METADATA)
    example = mix_sources(records[:2], settings, None, with_waveforms=True)
    assert example["waveforms"].shape == (2, 65535)
    start = int(round(crop_start(5, settings) / 256)) * 256  # 10 frames: centre 10 // 2
    np.testing.assert_array_equal(
        example["waveforms"][0] * 2, records[0]["waveform"][start : start + 65535]
    )
    mix = example["mix_stft"][..., 0] + 1j * example["mix_stft"][..., 1]
    np.testing.assert_allclose(np.abs(mix), example["mag_mix"], rtol=1e-6)


def test_crops_beyond_the_clip_are_zero():
    records = synthetic_records(seconds=5.0)
    settings = MixSettings.from_config(config_for(), METADATA)
    example = mix_sources(records[:2], settings, None, with_waveforms=True)
    # A 5-frame clip's middle frame (2) is 1.5 s in: the crop starts 0.55 s before the clip.
    start = crop_start(2, settings)
    assert start < 0
    leading = -int(round(start / 256)) * 256
    assert not example["waveforms"][0][:leading].any()
    assert example["waveforms"][0][leading:].any()


def test_training_stream_is_deterministic_and_resumes_from_its_state():
    records = synthetic_records()
    config = config_for(batch_size=4)
    first = iter(training_dataset(config, records, METADATA))
    batches = [next(first) for _ in range(3)]
    assert batches[0]["mag_mix"].shape == (4, 513, 256)
    again = iter(training_dataset(config, records, METADATA))
    for want in batches:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Restoring the iterator state after batch 1 gives batches 2 and 3 again.
    resumed = iter(training_dataset(config, records, METADATA))
    next(resumed)
    state = resumed.get_state()
    fresh = iter(training_dataset(config, records, METADATA))
    fresh.set_state(state)
    for want in batches[1:]:
        np.testing.assert_array_equal(next(fresh)["mags"], want["mags"])
    other_seed = next(iter(training_dataset(config, records, METADATA, seed=99)))
    assert not np.array_equal(other_seed["mags"], batches[0]["mags"])


def test_hosts_read_disjoint_shares():
    records = synthetic_records()
    config = config_for(batch_size=4)
    host0 = next(
        iter(training_dataset(config, records, METADATA, process_index=0, process_count=2))
    )
    host1 = next(
        iter(training_dataset(config, records, METADATA, process_index=1, process_count=2))
    )
    assert host0["mags"].shape[0] == host1["mags"].shape[0] == 2
    assert not np.array_equal(host0["mags"], host1["mags"])
    # Together they are the one-host batch, host 0 its first rows: each example meets the same
    # device whatever the number of hosts.
    whole = next(iter(training_dataset(config, records, METADATA)))
    np.testing.assert_array_equal(np.concatenate([host0["mags"], host1["mags"]]), whole["mags"])


def test_multiprocess_workers_give_the_same_batches():
    records = synthetic_records(count=4, seconds=5.0)  # small: the workers receive a copy
    serial = iter(training_dataset(config_for(workers=0), records, METADATA))
    parallel = iter(training_dataset(config_for(workers=1), records, METADATA))
    for _ in range(2):
        np.testing.assert_array_equal(next(parallel)["mags"], next(serial)["mags"])


def test_evaluation_dataset_is_deterministic_per_index():
    records = synthetic_records()
    config = config_for()
    a = evaluation_dataset(config, records, METADATA, limit=3)
    b = evaluation_dataset(config, records, METADATA)
    assert len(a) == 3 and len(b) == 6
    np.testing.assert_array_equal(a[2]["mags"], b[2]["mags"])


def test_sharded_batches_cover_every_element_once_with_padding():
    mesh = sharding.make_mesh(default_config())
    devices = mesh.devices.size
    size = 2 * devices + 3  # two full batches and a partial one
    batches = list(input_pipeline.sharded_batches(
        lambda i: {"value": np.float32(10 * i)}, size, devices, mesh))
    assert len(batches) == 3
    index = np.concatenate([np.asarray(b["index"]) for b in batches])
    valid = np.concatenate([np.asarray(b["valid"]) for b in batches])
    value = np.concatenate([np.asarray(b["value"]) for b in batches])
    assert sorted(index[valid > 0]) == list(range(size))
    assert (valid[index >= size] == 0).all() and (index >= size).sum() == devices - 3
    np.testing.assert_array_equal(value, 10 * (index % size))
    assert all(isinstance(b["value"], jax.Array) and b["value"].sharding.mesh == mesh
               for b in batches)


def test_model_inputs_pick_queries_by_kind_and_mode():
    batch = {"mag_mix": 1, "mags": 2, "image_queries": 3, "text_queries": 4, "labels": 5}
    config = config_for()
    model_batch = model_inputs
    assert model_batch(config, batch)["queries"] == 3
    config.query.mode = "text"
    assert model_batch(config, batch)["queries"] == 4
    config.query.mode = "hybrid"
    assert {k: v for k, v in model_batch(config, batch).items() if "queries" in k} == {
        "image_queries": 3,
        "text_queries": 4,
    }
    config.model.kind = "labelsep"
    assert model_batch(config, batch)["queries"] == 5
    config.model.kind = "pit"
    assert set(model_batch(config, batch)) == {"mag_mix", "mags"}


def test_dataset_settings_must_match_the_config():
    config = config_for()
    config.audio.hop_length = 512
    with pytest.raises(ValueError, match="hop_length=256"):
        MixSettings.from_config(config, METADATA)
