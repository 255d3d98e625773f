"""A MUSIC-like dataset rendered on this machine: nothing to download.

Each clip is a random melody played by one of MUSIC's 11 instruments, rendered at 16 kHz from
the General MIDI soundfont that ships with pretty_midi (TimGM6mb.sf2) by tinysoundfont, with
video frames at 1 fps showing a class-specific scene (colours, a pattern and a prop, varied per
clip and moving per frame). :func:`write_tree` writes the clips in the reference's index layout
(``train.csv``, ``val.csv``, ``test.csv`` naming WAV files and frame folders); the TFDS builder
``synth_music`` (:class:`SynthMusic`, below) renders that tree into its work folder and then
extracts it exactly as the ``music`` builder does (same features, same CLIP frame-embedding
path), so training and evaluation run unchanged.

Melodies vary in tempo (70-150 bpm), register (a 1.5-octave window inside the instrument's
range), scale, note lengths, dynamics (phrase velocity and per-note jitter) and rests. Every clip
draws from its own seed ``(seed, split, class, index)``: the splits hold disjoint melodies, and
the whole dataset is a function of the seed.
"""

from __future__ import annotations

import colorsys
import csv
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile
import tensorflow_datasets as tfds
from huggingface_hub import snapshot_download
from PIL import Image

from clipsep_jax.encoders.clip import CLIP
from clipsep_jax.encoders.clip_towers import CLIPConfig, TowerConfig
from data_prep.builders import ClipDatasetBuilder
from data_prep.extract import ExtractOptions

__all__ = ["INSTRUMENTS", "SPLITS", "soundfont_path", "render_melody", "scene_frames",
           "write_tree", "SynthMusic", "resolve_clip", "prepare", "prepare_for_config"]

# label -> (General MIDI program, 0-based; lowest and highest MIDI note played)
INSTRUMENTS: dict[str, tuple[int, int, int]] = {
    "accordion": (21, 53, 81),
    "acoustic guitar": (24, 40, 76),  # Acoustic Guitar (nylon)
    "cello": (42, 36, 69),
    "clarinet": (71, 50, 86),
    "erhu": (110, 62, 93),  # GM has no erhu; Fiddle is the nearest bowed two-string sound
    "flute": (73, 60, 96),
    "saxophone": (65, 49, 81),  # Alto Sax
    "trumpet": (56, 54, 82),
    "tuba": (58, 28, 58),
    "violin": (40, 55, 93),
    "xylophone": (13, 65, 96),
}
SPLITS = ("train", "val", "test")
_SCALES = ((0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10), (0, 2, 4, 7, 9), (0, 3, 5, 7, 10))
_NOTE_BEATS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
_NOTE_WEIGHTS = (0.1, 0.35, 0.1, 0.25, 0.1, 0.1)


def soundfont_path() -> str:
    """pretty_midi's General MIDI soundfont (TimGM6mb.sf2)."""

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pretty_midi's soundfont is missing; reinstall "
                                "pretty_midi")
    return path


def _melody(rng: np.random.Generator, low: int, high: int, seconds: float):
    """[(start s, duration s, MIDI note, velocity)] of one random melody."""
    tempo = rng.uniform(70, 150)
    beat = 60.0 / tempo
    span = min(18, high - low)
    bottom = int(rng.integers(low, high - span + 1))
    scale = _SCALES[rng.integers(len(_SCALES))]
    root = int(rng.integers(12))
    pitches = [p for p in range(bottom, bottom + span + 1) if (p - root) % 12 in scale]
    position = int(rng.integers(len(pitches)))
    phrase_velocity = rng.uniform(60, 115)
    notes, time = [], float(rng.uniform(0, 0.3))
    while time < seconds:
        length = float(rng.choice(_NOTE_BEATS, p=_NOTE_WEIGHTS)) * beat
        if rng.random() < 0.06:  # a short rest (a crop of pure silence cannot be scored)
            time += min(length, beat)
            continue
        if rng.random() < 0.1:  # a new phrase: new dynamics
            phrase_velocity = rng.uniform(60, 115)
        position = int(np.clip(position + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), 0,
                               len(pitches) - 1))
        velocity = int(np.clip(phrase_velocity + rng.normal(0, 8), 30, 127))
        notes.append((time, length * rng.uniform(0.75, 1.0), pitches[position], velocity))
        time += length
    return notes


def render_melody(label: str, rng: np.random.Generator, seconds: float,
                  sample_rate: int = 16000, soundfont: str | None = None) -> np.ndarray:
    """A random melody of ``label``'s instrument: float32 mono [seconds * sample_rate], peak
    between 0.4 and 0.9."""
    # tinysoundfont (and the PyAudio it declares) is needed only to render: imported here so
    # that reading a built dataset does not need it.
    import tinysoundfont

    program, low, high = INSTRUMENTS[label]
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    font = synth.sfload(soundfont or soundfont_path())
    synth.program_select(0, font, 0, program)
    events = []
    for start, duration, note, velocity in _melody(rng, low, high, seconds):
        events.append((start, 1, note, velocity))
        events.append((start + duration, 0, note, 0))
    events.sort()
    total = int(round(seconds * sample_rate))
    pieces, done = [], 0
    for time, on, note, velocity in events:
        at = min(int(round(time * sample_rate)), total)
        if at > done:
            pieces.append(np.frombuffer(synth.generate(at - done), np.float32))
            done = at
        if on:
            synth.noteon(0, note, velocity)
        else:
            synth.noteoff(0, note)
    if total > done:
        pieces.append(np.frombuffer(synth.generate(total - done), np.float32))
    stereo = np.concatenate(pieces).reshape(-1, 2)
    mono = stereo.mean(axis=1)
    peak = float(np.abs(mono).max())
    if peak == 0.0:
        raise RuntimeError(f"tinysoundfont rendered silence for {label!r} (program {program})")
    return (mono / peak * rng.uniform(0.4, 0.9)).astype(np.float32)


def _class_palette(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours (background, prop) of class ``index``, far apart in hue."""

    hue = index / len(INSTRUMENTS)
    background = np.array(colorsys.hsv_to_rgb(hue, 0.55, 0.8)) * 255
    prop = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.95)) * 255
    return background, prop


def scene_frames(label: str, rng: np.random.Generator, count: int, size: int = 96
                 ) -> np.ndarray:
    """``count`` video frames uint8 [count, size, size, 3] of ``label``'s scene: the class's
    colours and pattern (stripes at a class angle, a disc or a bar), with a per-clip shift in
    brightness, position and pattern phase, drifting from frame to frame, plus sensor noise."""
    index = list(INSTRUMENTS).index(label)
    background, prop = _class_palette(index)
    brightness = rng.uniform(0.8, 1.15)
    angle = np.pi * index / len(INSTRUMENTS)
    period = 10 + 2 * (index % 4)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = rng.uniform(0.3, 0.7, 2) * size
    drift = rng.normal(0, 1.5, 2)
    phase = rng.uniform(0, 2 * np.pi)
    frames = []
    for f in range(count):
        cy, cx = centre + drift * f
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle))
                                     / period + phase + 0.3 * f)
        image = background[None, None] * (0.75 + 0.25 * stripes[..., None])
        radius = size * (0.14 + 0.02 * (index % 3))
        if index % 2:
            prop_mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        else:
            prop_mask = (np.abs(x - cx) < radius * 1.4) & (np.abs(y - cy) < radius * 0.6)
        image[prop_mask] = prop
        image = image * brightness + rng.normal(0, 6, image.shape)
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_tree(folder: str | Path, clips_per_class: tuple[int, int, int] = (16, 3, 4),
               seconds: float = 8.0, seed: int = 0, sample_rate: int = 16000,
               labels: tuple[str, ...] | None = None) -> Path:
    """Renders the dataset's input tree into ``folder`` (index layout, see the module docs):
    ``clips_per_class`` (train, val, test) clips of ``seconds`` per instrument. Written under a
    temporary name and renamed; a finished tree is left as it is."""

    folder = Path(folder).absolute()
    if (folder / "test.csv").is_file():
        return folder
    labels = tuple(labels or INSTRUMENTS)
    unknown = [label for label in labels if label not in INSTRUMENTS]
    if unknown:
        raise ValueError(f"unknown instruments {unknown}; choose from {list(INSTRUMENTS)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        font = soundfont_path()
        for split_id, (split, count) in enumerate(zip(SPLITS, clips_per_class, strict=True)):
            rows = []
            for label in labels:
                class_id = list(INSTRUMENTS).index(label)
                slug = label.replace(" ", "_")
                for i in range(count):
                    rng = np.random.default_rng([seed, split_id, class_id, i])
                    name = f"{split}_{slug}_{i:03d}"
                    wave = render_melody(label, rng, seconds, sample_rate, font)
                    audio_path = staging / "audio" / slug / f"{name}.wav"
                    audio_path.parent.mkdir(parents=True, exist_ok=True)
                    soundfile.write(audio_path, wave, sample_rate, subtype="FLOAT")
                    frames_dir = staging / "frames" / slug / name
                    frames_dir.mkdir(parents=True, exist_ok=True)
                    frames = scene_frames(label, rng, int(seconds))
                    for f, frame in enumerate(frames, 1):
                        Image.fromarray(frame).save(frames_dir / f"{f:06d}.jpg", quality=92)
                    rows.append([f"audio/{slug}/{name}.wav", f"frames/{slug}/{name}",
                                 str(len(frames)), label])
            with open(staging / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


class SynthMusic(ClipDatasetBuilder):
    """MUSIC's 11 instruments playing random melodies, rendered here from a General MIDI
    soundfont, with generated class scenes as video frames (this module).

    Needs no input: the clips are rendered into the work folder, then extracted as ``music``.
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def __init__(self, *, clips_per_class: Sequence[int] = (16, 3, 4), seconds: float = 8.0,
                 seed: int = 0, **kwargs):
        self.clips_per_class = tuple(int(c) for c in clips_per_class)
        self.seconds = float(seconds)
        self.seed = int(seed)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        name = "rendered-{}-{}s-seed{}".format("x".join(map(str, self.clips_per_class)),
                                                self.seconds, self.seed)
        tree = write_tree(os.path.join(self.work_dir, name), self.clips_per_class,
                                      self.seconds, self.seed, self.options.sample_rate)
        self.info.metadata.update({"synth_clips_per_class": list(self.clips_per_class),
                                   "synth_seconds": self.seconds, "synth_seed": self.seed})
        return self._splits_from(os.fspath(tree))



def resolve_clip(clip: str, data_dir: str | Path) -> str:
    """``clip`` when it is a local folder or a hub id already in the local Hugging Face cache;
    otherwise a random-weight small CLIP (ViT-B/32's 512-dim embeddings), created once in
    ``data_dir/_clip/random-small``. Nothing is downloaded."""
    if os.path.isdir(clip):
        return clip
    try:
        return snapshot_download(clip, local_files_only=True,
                                 allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except Exception:  # not cached (or no hub library): the offline stand-in
        pass
    folder = Path(data_dir).absolute() / "_clip" / "random-small"
    if not (folder / "config.json").is_file():

        config = CLIPConfig(
            vision=TowerConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, image_size=96, patch_size=16),
            text=TowerConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=520,
                             max_position_embeddings=77),
            projection_dim=512)
        folder.parent.mkdir(parents=True, exist_ok=True)
        CLIP.random(config, seed=0).save_pretrained(str(folder))
    return str(folder)


def prepare(data_dir: str | Path, *, clip: str, clips_per_class=(16, 3, 4), seconds: float = 8.0,
            seed: int = 0, min_samples: int = 16383, progress: bool = True):
    """Builds the ``synth_music`` TFDS dataset in ``data_dir`` unless it is there; returns the
    builder (its ``info.metadata['clip']`` names the CLIP that embedded the frames)."""


    builder = SynthMusic(data_dir=os.fspath(data_dir), clip=clip, clips_per_class=clips_per_class,
                         seconds=seconds, seed=seed,
                         options=ExtractOptions(min_samples=min_samples))
    if not progress:
        tfds.disable_progress_bar()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def prepare_for_config(config) -> None:
    """The demo's first step: builds ``config.data`` (synth_music) if it is missing, then points
    ``config.query.encoder_model`` at the CLIP that embedded its frames (the text queries must come
    from the same CLIP). A dataset built with other synth settings is refused, not reused."""


    d = config.data
    if d.name != "synth_music":
        raise ValueError(f"config.data.prepare_if_missing: only synth_music can be prepared "
                         f"without inputs; prepare {d.name!r} with python -m data_prep.build")
    if not d.data_dir:
        raise ValueError("config.data.data_dir is empty: where should the dataset go?")
    built = Path(d.data_dir) / "synth_music" / str(SynthMusic.VERSION)
    if (built / "dataset_info.json").is_file():
        metadata = tfds.builder_from_directory(str(built)).info.metadata
        wanted = {"synth_clips_per_class": [int(c) for c in d.synth_clips_per_class],
                  "synth_seconds": float(d.synth_seconds), "synth_seed": int(d.synth_seed)}
        differs = {k: (metadata.get(k), v) for k, v in wanted.items() if metadata.get(k) != v}
        if differs:
            raise ValueError(f"{built} was built with other settings (built, asked): {differs}; "
                             "choose another config.data.data_dir or delete that folder")
        clip = metadata["clip"]
        if not os.path.isdir(clip):  # a hub id: the cached copy, or the offline stand-in
            clip = resolve_clip(clip, d.data_dir)
    else:
        clip = resolve_clip(config.query.encoder_model, d.data_dir)
        print(f"preparing synth_music in {d.data_dir} (CLIP: {clip})", flush=True)
        builder = prepare(d.data_dir, clip=clip, clips_per_class=tuple(d.synth_clips_per_class),
                          seconds=d.synth_seconds, seed=d.synth_seed,
                          min_samples=config.audio.crop_samples)
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f"synth_music ready: {splits}", flush=True)
    config.query.encoder_model = clip
