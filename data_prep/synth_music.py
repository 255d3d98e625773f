"""A MUSIC-like dataset rendered on this machine: nothing to download.

Each clip is a random melody played by one of MUSIC's 11 instruments, rendered at 16 kHz from a
General MIDI soundfont by tinysoundfont, with video frames at 1 fps showing a class-specific scene
(colours, a pattern and a prop, varied per clip and moving per frame). :func:`write_tree` writes
the clips in the reference's index layout (``train.csv``, ``val.csv``, ``test.csv`` naming WAV
files and frame folders, plus ``held_out.csv``); the TFDS builder ``synth_music``
(:class:`SynthMusic`, below) renders that tree into its work folder and then extracts it exactly
as the ``music`` builder does (same features, same CLIP frame-embedding path), so training and
evaluation run unchanged.

Melodies vary in tempo (70-150 bpm), register (a 1.5-octave window inside the instrument's
range), scale, note lengths, dynamics (phrase velocity and per-note jitter) and rests. So that a
model learns instruments rather than one soundfont's samples, the train / val / test clips
(:data:`TRAINING_SOUNDFONTS`) take turns among three soundfonts (two sample banks, one FM) and among
related General MIDI programs (nylon and steel guitar, alto, soprano and tenor sax, ...), and
every clip is played and recorded differently (:func:`draw_performance`,
:func:`vary_recording`): velocity curve, tuning, vibrato, scoops into notes, articulation, EQ,
room reverb, level swells, noise floor. The ``held_out`` split is rendered plainly from a fourth
soundfont, FluidR3_GM (:data:`HELD_OUT_SOUNDFONT`), which nothing else uses: the FluidR3 family
(FluidR3_GM, FluidR3Mono, MuseScore General) never reaches training. Every clip draws from its own
seed ``(seed, split, class, index)``: the splits hold disjoint melodies, and the whole dataset is
a function of the seed.
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile
import tensorflow_datasets as tfds
from huggingface_hub import snapshot_download
from PIL import Image
from scipy import signal

from clipsep_jax.encoders.clip import CLIP
from clipsep_jax.encoders.clip_towers import CLIPConfig, TowerConfig
from clipsep_jax.files import staging_folder
from data_prep.builders import ClipDatasetBuilder
from data_prep.extract import ExtractOptions
from data_prep.sources import ClipSource

__all__ = ["INSTRUMENTS", "SPLITS", "SOUNDFONTS", "TRAINING_SOUNDFONTS", "HELD_OUT_SOUNDFONT",
           "Performance", "Renderer", "soundfont_path", "render_melody", "draw_performance",
           "vary_recording", "render_clip", "scene_frames", "write_tree", "SynthMusic",
           "resolve_clip", "prepare", "prepare_for_config"]

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
# Other General MIDI programs of the same instrument, taking turns with the instrument's own in
# training clips: Tango Accordion, Acoustic Guitar (steel), Soprano and Tenor Sax, Muted Trumpet.
_RELATED_PROGRAMS: dict[str, tuple[int, ...]] = {
    "accordion": (23,),
    "acoustic guitar": (25,),
    "saxophone": (64, 66),
    "trumpet": (59,),
}
_PLUCKED_OR_STRUCK = ("acoustic guitar", "xylophone")  # no vibrato, no scoops
SPLITS = ("train", "val", "test", "held_out")

# name -> (file, what installs it); licences: GPL-2 (Tim Brechbill), public domain, CC-BY-SA-4.0
# (Zandro Reveille), MIT (Frank Wen).
SOUNDFONTS: dict[str, tuple[str, str]] = {
    "TimGM6mb": (os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2"),
                 "reinstall pretty_midi"),
    "sf_GMbank": ("/usr/share/sounds/sf2/sf_GMbank.sf2", "apt-get install csound-soundfont"),
    "OPL-3_FM_128M": ("/usr/share/sounds/sf2/OPL-3_FM_128M.sf2",
                      "apt-get install opl3-soundfont"),
    "FluidR3_GM": ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "apt-get install fluid-soundfont-gm"),
}
# train / val / test. None of them shares a sample with FluidR3_GM (compared sample by sample);
# TimGM6mb and sf_GMbank share some (guitar, bowed strings, clarinet, tuba, xylophone).
TRAINING_SOUNDFONTS = ("TimGM6mb", "sf_GMbank", "OPL-3_FM_128M")
HELD_OUT_SOUNDFONT = "FluidR3_GM"  # the held_out split only

_SCALES = ((0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10), (0, 2, 4, 7, 9), (0, 3, 5, 7, 10))
_NOTE_BEATS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
_NOTE_WEIGHTS = (0.1, 0.35, 0.1, 0.25, 0.1, 0.1)
_BEND_RANGE_CENTS = 200.0  # the pitch wheel's range, up and down
_CONTROL_SECONDS = 0.01  # pitch-wheel updates for vibrato and scoops


def soundfont_path(name: str = "TimGM6mb") -> str:
    """The file of soundfont ``name`` (a key of :data:`SOUNDFONTS`); FileNotFoundError naming
    the file and what installs it when it is missing."""
    if name not in SOUNDFONTS:
        raise ValueError(f"unknown soundfont {name!r}; choose from {list(SOUNDFONTS)}")
    path, remedy = SOUNDFONTS[name]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the {name} soundfont is missing; {remedy}")
    return path


@dataclasses.dataclass(frozen=True)
class Performance:
    """How one clip is played. The default is a plain rendering of the instrument's own
    program."""

    program: int | None = None  # General MIDI program (0-based); None: the instrument's own
    velocity_gamma: float = 1.0  # the velocity curve: v -> 127 * (v / 127) ** gamma
    articulation: float = 1.0  # note lengths are scaled by this (> 1: notes overlap, legato)
    tuning: float = 0.0  # semitones, the whole clip
    vibrato_hz: float = 0.0
    vibrato_cents: float = 0.0  # peak pitch deviation; 0: no vibrato
    vibrato_delay: float = 0.2  # seconds into each note before the vibrato fades in
    scoop_probability: float = 0.0  # of a note starting flat and bending up to pitch
    scoop_cents: float = 0.0  # how flat a scooped note starts
    scoop_seconds: float = 0.08  # how long the bend up takes


def draw_performance(label: str, rng: np.random.Generator) -> Performance:
    """A random way of playing ``label``'s instrument (program among the related ones,
    velocity curve, articulation, tuning; vibrato and scoops for sustained instruments)."""
    programs = (INSTRUMENTS[label][0], *_RELATED_PROGRAMS.get(label, ()))
    program = int(programs[rng.integers(len(programs))])
    velocity_gamma = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    articulation = float(rng.uniform(0.6, 1.1))
    tuning = float(rng.uniform(-0.25, 0.25))
    if label in _PLUCKED_OR_STRUCK:
        return Performance(program, velocity_gamma, articulation, tuning)
    vibrato = rng.random() < 0.7
    return Performance(
        program, velocity_gamma, articulation, tuning,
        vibrato_hz=float(rng.uniform(4.5, 7.0)),
        vibrato_cents=float(rng.uniform(8, 40)) if vibrato else 0.0,
        vibrato_delay=float(rng.uniform(0.05, 0.4)),
        scoop_probability=float(rng.uniform(0.0, 0.35)),
        scoop_cents=float(rng.uniform(20, 90)),
        scoop_seconds=float(rng.uniform(0.04, 0.15)))


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


def _bend_curve(notes, performance: Performance, rng: np.random.Generator, seconds: float
                ) -> np.ndarray | None:
    """Pitch deviation in cents [seconds / _CONTROL_SECONDS] (one value per control tick) from
    the vibrato and the scoops of ``notes``; None when the performance bends nothing."""
    if performance.vibrato_cents == 0.0 and performance.scoop_probability == 0.0:
        return None
    ticks = np.arange(int(np.ceil(seconds / _CONTROL_SECONDS))) * _CONTROL_SECONDS
    starts = np.array([start for start, *_ in notes])
    scooped = rng.random(len(notes)) < performance.scoop_probability
    current = np.clip(np.searchsorted(starts, ticks, side="right") - 1, 0, None)
    since = ticks - starts[current]  # seconds since the sounding note began
    fade_in = np.clip((since - performance.vibrato_delay) / 0.25, 0.0, 1.0)
    cents = (performance.vibrato_cents * fade_in
             * np.sin(2 * np.pi * performance.vibrato_hz * ticks))
    scoop = np.clip(1.0 - since / performance.scoop_seconds, 0.0, 1.0)
    return cents - performance.scoop_cents * scoop * scooped[current]


class Renderer:
    """Renders melodies with tinysoundfont at ``sample_rate`` (Hz), loading each soundfont once.
    Every clip starts from silence with the channel's pitch state set anew, so a clip sounds
    the same whatever was rendered before it."""

    def __init__(self, sample_rate: int = 16000):
        self.sample_rate = sample_rate
        self._synths: dict[str, tuple[object, int]] = {}

    def _synth(self, soundfont: str):
        if soundfont not in self._synths:
            # tinysoundfont (and the PyAudio it declares) is needed only to render: imported here
            # so that reading a built dataset does not need it.
            import tinysoundfont

            synth = tinysoundfont.Synth(samplerate=self.sample_rate)
            self._synths[soundfont] = (synth, synth.sfload(soundfont_path(soundfont)))
        return self._synths[soundfont]

    def melody(self, label: str, rng: np.random.Generator, seconds: float,
               soundfont: str = "TimGM6mb", performance: Performance = Performance()
               ) -> np.ndarray:
        """A random melody of ``label``'s instrument played as ``performance`` says: float32
        mono [seconds * sample_rate], not normalised."""
        program, low, high = INSTRUMENTS[label]
        if performance.program is not None:
            program = performance.program
        notes = _melody(rng, low, high, seconds)
        synth, font = self._synth(soundfont)
        synth.sounds_off()
        synth.generate(self.sample_rate // 10)  # lets the quick release of old voices end
        synth.program_select(0, font, 0, program)
        synth.pitchbend_range(0, _BEND_RANGE_CENTS / 100)
        synth.pitchbend(0, 8192)
        synth.set_tuning(0, performance.tuning)
        events = []  # (time s, order at that time, what, arguments)
        for start, duration, note, velocity in notes:
            loudness = 127 * (velocity / 127) ** performance.velocity_gamma
            events.append((start, 2, "on", (note, int(np.clip(round(loudness), 1, 127)))))
            events.append((start + duration * performance.articulation, 0, "off", (note,)))
        bend = _bend_curve(notes, performance, rng, seconds)
        if bend is not None:
            wheel = np.clip(np.round(8192 + bend / _BEND_RANGE_CENTS * 8192), 0, 16383)
            events += [(i * _CONTROL_SECONDS, 1, "bend", (int(w),)) for i, w in enumerate(wheel)]
        events.sort()
        total = int(round(seconds * self.sample_rate))
        pieces, done = [], 0
        for time, _, what, arguments in events:
            at = min(int(round(time * self.sample_rate)), total)
            if at > done:
                pieces.append(np.frombuffer(synth.generate(at - done), np.float32))
                done = at
            if what == "on":
                synth.noteon(0, *arguments)
            elif what == "off":
                synth.noteoff(0, *arguments)
            else:
                synth.pitchbend(0, *arguments)
        if total > done:
            pieces.append(np.frombuffer(synth.generate(total - done), np.float32))
        mono = np.concatenate(pieces).reshape(-1, 2).mean(axis=1)
        if not np.abs(mono).max() > 0.0:
            raise RuntimeError(f"tinysoundfont rendered silence for {label!r} (program "
                               f"{program} of {soundfont})")
        return mono


def _normalised(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``wave`` as float32 with its peak drawn between 0.4 and 0.9."""
    return (wave / np.abs(wave).max() * rng.uniform(0.4, 0.9)).astype(np.float32)


def render_melody(label: str, rng: np.random.Generator, seconds: float,
                  sample_rate: int = 16000, soundfont: str = "TimGM6mb") -> np.ndarray:
    """A random melody of ``label``'s instrument, rendered plainly from ``soundfont`` (a key of
    :data:`SOUNDFONTS`): float32 mono [seconds * sample_rate], peak between 0.4 and 0.9."""
    wave = Renderer(sample_rate).melody(label, rng, seconds, soundfont)
    return _normalised(wave, rng)


def _equaliser_db(frequencies: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random EQ's gain in dB at ``frequencies`` (Hz): a spectral tilt, up to three bell
    bands, a high-pass and, half the time, a low-pass (12 dB per octave)."""
    f = np.maximum(frequencies, 1.0)
    octaves = np.log2(f / 1000.0)
    gain = np.clip(rng.uniform(-3.0, 3.0) * octaves, -12.0, 12.0)
    for _ in range(int(rng.integers(0, 4))):
        centre = np.log2(np.exp(rng.uniform(np.log(150), np.log(6000))) / 1000.0)
        width = rng.uniform(0.3, 1.5)  # octaves
        gain += rng.uniform(-10, 10) * np.exp(-0.5 * ((octaves - centre) / width) ** 2)
    high_pass = np.exp(rng.uniform(np.log(30), np.log(300)))
    gain += 10 * np.log10(1.0 / (1.0 + (high_pass / f) ** 4))
    if rng.random() < 0.5:
        low_pass = np.exp(rng.uniform(np.log(2500), np.log(7500)))
        gain += 10 * np.log10(1.0 / (1.0 + (f / low_pass) ** 4))
    return gain


def _room_response(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A random room's impulse response [samples], direct sound first (1.0): a few early
    reflections and an exponentially decaying, low-passed noise tail (RT60 0.2-1.2 s,
    direct-to-reverberant ratio 0-15 dB)."""
    rt60 = float(np.exp(rng.uniform(np.log(0.2), np.log(1.2))))
    length = int(min(rt60, 1.0) * sample_rate)
    t = np.arange(length) / sample_rate
    tail = rng.normal(0.0, 1.0, length) * np.exp(-6.9 * t / rt60)
    tail[: int(0.005 * sample_rate)] = 0.0  # the tail arrives after the direct sound
    for _ in range(int(rng.integers(2, 7))):
        tail[int(rng.uniform(0.003, 0.04) * sample_rate)] += rng.uniform(-1, 1) * 8.0
    brightness = np.exp(rng.uniform(np.log(2000), np.log(7000)))  # Hz, the tail's low-pass
    tail = signal.sosfilt(signal.butter(2, brightness, fs=sample_rate, output="sos"), tail)
    ratio_db = rng.uniform(0.0, 15.0)
    tail *= np.sqrt(10 ** (-ratio_db / 10) / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def vary_recording(wave: np.ndarray, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """``wave`` [n] as if recorded differently: a random EQ, a room's reverb (three times in
    four), slow level swells of up to 4 dB and, half the time, a noise floor 30-55 dB under
    the signal. float64 [n]."""
    n = len(wave)
    padded = np.fft.rfft(wave, n + sample_rate // 2)  # room for the zero-phase EQ's tails
    frequencies = np.fft.rfftfreq(n + sample_rate // 2, 1.0 / sample_rate)
    wave = np.fft.irfft(padded * 10 ** (_equaliser_db(frequencies, rng) / 20))[:n]
    if rng.random() < 0.75:
        wave = signal.fftconvolve(wave, _room_response(rng, sample_rate))[:n]
    t = np.arange(n) / sample_rate
    swell_db = sum(rng.uniform(0, 2) * np.sin(2 * np.pi * rng.uniform(0.05, 0.5) * t
                                              + rng.uniform(0, 2 * np.pi)) for _ in range(2))
    wave = wave * 10 ** (swell_db / 20)
    if rng.random() < 0.5:
        spectrum = np.fft.rfft(rng.normal(0.0, 1.0, n))
        tilt = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 20.0) ** -rng.uniform(0, 0.5)
        noise = np.fft.irfft(spectrum * tilt, n)
        level = np.sqrt(np.mean(wave**2) / np.mean(noise**2)) * 10 ** (-rng.uniform(30, 55) / 20)
        wave = wave + noise * level
    return wave


def render_clip(renderer: Renderer, label: str, rng: np.random.Generator, seconds: float,
                soundfont: str, vary: bool) -> tuple[np.ndarray, Performance]:
    """One clip of ``label`` from ``soundfont``, played and recorded as drawn by
    :func:`draw_performance` and :func:`vary_recording` when ``vary``, plainly otherwise: (float32
    mono [seconds * renderer.sample_rate] with its peak between 0.4 and 0.9, the performance)."""
    if vary:
        performance = draw_performance(label, rng)
    else:
        performance = Performance(program=INSTRUMENTS[label][0])
    wave = renderer.melody(label, rng, seconds, soundfont, performance)
    if vary:
        wave = vary_recording(wave, rng, renderer.sample_rate)
    return _normalised(wave, rng), performance


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


def _check_soundfonts(clips_per_class: Sequence[int]) -> None:
    """FileNotFoundError naming the file and its package when a soundfont that the splits with
    clips (``clips_per_class``: train, val, test[, held_out]) are rendered from is missing."""
    needed = (TRAINING_SOUNDFONTS if sum(clips_per_class[:3]) else ()) + (
        (HELD_OUT_SOUNDFONT,) if sum(clips_per_class[3:]) else ())
    for name in needed:
        soundfont_path(name)


def write_tree(folder: str | Path, clips_per_class: Sequence[int] = (16, 3, 4, 4),
               seconds: float = 8.0, seed: int = 0, sample_rate: int = 16000,
               labels: tuple[str, ...] | None = None, vary: bool = True) -> Path:
    """Renders the dataset's input tree into ``folder`` (index layout, see the module docs):
    ``clips_per_class`` (train, val, test[, held_out]) clips of ``seconds`` per instrument.
    train / val / test take turns among :data:`TRAINING_SOUNDFONTS`, each clip played and
    recorded in its own way (plainly, with the instrument's own program, when ``vary`` is
    False); held_out is plain :data:`HELD_OUT_SOUNDFONT` (``held_out.csv``).
    ``renderings.csv`` names each clip's soundfont and program. Written under a temporary name
    and renamed; a finished tree is left as it is."""

    folder = Path(folder).absolute()
    if (folder / "test.csv").is_file():
        return folder
    counts = tuple(int(c) for c in clips_per_class)
    if len(counts) not in (3, 4) or min(counts) < 0:
        raise ValueError(f"clips_per_class={clips_per_class}: expected 3 or 4 counts >= 0 "
                         f"(per instrument, for {', '.join(SPLITS)})")
    labels = tuple(labels or INSTRUMENTS)
    unknown = [label for label in labels if label not in INSTRUMENTS]
    if unknown:
        raise ValueError(f"unknown instruments {unknown}; choose from {list(INSTRUMENTS)}")
    _check_soundfonts(counts)
    renderer = Renderer(sample_rate)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(folder)
    try:
        renderings = [["audio", "soundfont", "program"]]
        for split_id, (split, count) in enumerate(zip(SPLITS[:len(counts)], counts, strict=True)):
            rows = []
            for label in labels:
                class_id = list(INSTRUMENTS).index(label)
                slug = label.replace(" ", "_")
                for i in range(count):
                    rng = np.random.default_rng([seed, split_id, class_id, i])
                    name = f"{split}_{slug}_{i:03d}"
                    if split == "held_out":
                        soundfont, varied = HELD_OUT_SOUNDFONT, False
                    else:
                        soundfont = TRAINING_SOUNDFONTS[(i + class_id)
                                                        % len(TRAINING_SOUNDFONTS)]
                        varied = vary
                    wave, performance = render_clip(renderer, label, rng, seconds,
                                                    soundfont, varied)
                    audio = f"audio/{slug}/{name}.wav"
                    (staging / audio).parent.mkdir(parents=True, exist_ok=True)
                    soundfile.write(staging / audio, wave, sample_rate, subtype="FLOAT")
                    frames_dir = staging / "frames" / slug / name
                    frames_dir.mkdir(parents=True, exist_ok=True)
                    frames = scene_frames(label, rng, int(seconds))
                    for f, frame in enumerate(frames, 1):
                        Image.fromarray(frame).save(frames_dir / f"{f:06d}.jpg", quality=92)
                    rows.append([audio, f"frames/{slug}/{name}", str(len(frames)), label])
                    renderings.append([audio, soundfont, performance.program])
            with open(staging / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
        with open(staging / "renderings.csv", "w", newline="") as f:
            csv.writer(f).writerows(renderings)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


class SynthMusic(ClipDatasetBuilder):
    """MUSIC's 11 instruments playing random melodies, rendered here from General MIDI
    soundfonts, with generated class scenes as video frames (this module).

    Needs no input: the clips are rendered into the work folder, then extracted as ``music``;
    the splits are train, val, test and (with a fourth count) held_out.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        **ClipDatasetBuilder.RELEASE_NOTES,
        "1.1.0": "Three training soundfonts, varied performances and recordings; the held_out "
                 "split (FluidR3_GM).",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def __init__(self, *, clips_per_class: Sequence[int] = (16, 3, 4, 4), seconds: float = 8.0,
                 seed: int = 0, vary: bool = True, **kwargs):
        self.clips_per_class = tuple(int(c) for c in clips_per_class)
        self.seconds = float(seconds)
        self.seed = int(seed)
        self.vary = bool(vary)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        name = "rendered-{}-{}s-seed{}{}".format("x".join(map(str, self.clips_per_class)),
                                                  self.seconds, self.seed,
                                                  "" if self.vary else "-plain")
        tree = write_tree(os.path.join(self.work_dir, name), self.clips_per_class,
                          self.seconds, self.seed, self.options.sample_rate, vary=self.vary)
        self.info.metadata.update({
            "synth_clips_per_class": list(self.clips_per_class),
            "synth_seconds": self.seconds, "synth_seed": self.seed, "synth_vary": self.vary,
            "synth_soundfonts": {"train": list(TRAINING_SOUNDFONTS),
                                 "held_out": [HELD_OUT_SOUNDFONT]}})
        return self._splits_from(os.fspath(tree))

    def _sources(self, manual_dir: str):
        """The index CSVs' clips, and those of ``held_out.csv`` (written by :func:`write_tree`
        in the same layout)."""
        sources, skips = super()._sources(manual_dir)
        held_out = os.path.join(manual_dir, "held_out.csv")
        if os.path.isfile(held_out):
            with open(held_out, newline="") as f:
                for audio, frames, count, label in csv.reader(f):
                    audio_path = os.path.join(manual_dir, audio)
                    sources.append(ClipSource(
                        "held_out", f"{label.replace(' ', '_')}/{Path(audio).stem}", label,
                        audio_path, audio_path=audio_path,
                        frames_dir=os.path.join(manual_dir, frames), frame_count=int(count)))
        return sources, skips


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


def prepare(data_dir: str | Path, *, clip: str, clips_per_class: Sequence[int] = (16, 3, 4, 4),
            seconds: float = 8.0, seed: int = 0, min_samples: int = 16383,
            progress: bool = True, vary: bool = True) -> SynthMusic:
    """Builds the ``synth_music`` TFDS dataset in ``data_dir`` unless it is there; returns the
    builder (its ``info.metadata['clip']`` names the CLIP that embedded the frames)."""


    builder = SynthMusic(data_dir=os.fspath(data_dir), clip=clip, clips_per_class=clips_per_class,
                         seconds=seconds, seed=seed, vary=vary,
                         options=ExtractOptions(min_samples=min_samples))
    if not progress:
        tfds.disable_progress_bar()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def prepare_for_config(config) -> None:
    """The demo's first step: builds ``config.data`` (synth_music) if it is missing, then points
    ``config.query.encoder_model`` at the CLIP that embedded its frames (the text queries must come
    from the same CLIP). A dataset built with other synth settings is refused, not reused; a
    missing soundfont is refused before any work, naming the file and what installs it."""


    d = config.data
    if d.name != "synth_music":
        raise ValueError(f"config.data.prepare_if_missing: only synth_music can be prepared "
                         f"without inputs; prepare {d.name!r} with python -m data_prep.build")
    if not d.data_dir:
        raise ValueError("config.data.data_dir is empty: where should the dataset go?")
    built = Path(d.data_dir) / "synth_music" / str(SynthMusic.VERSION)
    if (built / "dataset_info.json").is_file():
        metadata = dict(tfds.builder_from_directory(str(built)).info.metadata)
        metadata.setdefault("synth_vary", True)  # built before the option: varied
        wanted = {"synth_clips_per_class": [int(c) for c in d.synth_clips_per_class],
                  "synth_seconds": float(d.synth_seconds), "synth_seed": int(d.synth_seed),
                  "synth_vary": bool(d.synth_vary)}
        differs = {k: (metadata.get(k), v) for k, v in wanted.items() if metadata.get(k) != v}
        if differs:
            raise ValueError(f"{built} was built with other settings (built, asked): {differs}; "
                             "choose another config.data.data_dir or delete that folder")
        clip = metadata["clip"]
        if not os.path.isdir(clip):  # a hub id: the cached copy, or the offline stand-in
            clip = resolve_clip(clip, d.data_dir)
    else:
        _check_soundfonts([int(c) for c in d.synth_clips_per_class])  # before any long work
        clip = resolve_clip(config.query.encoder_model, d.data_dir)
        print(f"preparing synth_music in {d.data_dir} (CLIP: {clip})", flush=True)
        builder = prepare(d.data_dir, clip=clip, clips_per_class=tuple(d.synth_clips_per_class),
                          seconds=d.synth_seconds, seed=d.synth_seed, vary=bool(d.synth_vary),
                          min_samples=config.audio.crop_samples)
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f"synth_music ready: {splits}", flush=True)
    config.query.encoder_model = clip
