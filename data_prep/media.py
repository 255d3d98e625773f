"""Reading one clip's media: audio files, 1 fps frame folders, and video files through ffmpeg.

Everything that makes a clip unusable raises :class:`SkipClip` with a reason a person can act on;
what can be repaired (another sample rate, several channels) is repaired and noted. Nothing is
zero-filled.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np
import soundfile
from PIL import Image

from clipsep_jax import audio

__all__ = [
    "SkipClip",
    "load_audio_file",
    "decode_video",
    "decode_audio_stream",
    "check_waveform",
    "frame_paths",
    "load_frame",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".m4v")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


class SkipClip(Exception):  # noqa: N818 (a skip, not an error)
    """A clip that cannot go into the dataset; ``str(e)`` is the reason for the skip report."""


def _to_mono_resampled(
    samples: np.ndarray, rate: int, sample_rate: int, notes: list[str]
) -> np.ndarray:
    """[samples, channels] at ``rate`` -> mono float32 at ``sample_rate`` (mean of channels,
    soxr HQ resampling as librosa.load does by default)."""
    if samples.shape[1] > 1:
        notes.append(f"downmixed {samples.shape[1]} channels")
    mono = samples.mean(axis=1, dtype=np.float64)
    if rate != sample_rate:
        notes.append(f"resampled from {rate} Hz")
        mono = audio.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, np.float32)


def _wav_declared_frames(path: str) -> tuple[int, int] | None:
    """(frames the WAV header declares, frames the file holds), or None if not a plain WAV.

    libsndfile quietly shortens a truncated WAV to what is on disk; the header still says how
    long it was meant to be.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = f.read(size + (size & 1))
                    block_align = struct.unpack("<H", fmt[12:14])[0]
                elif name == b"data":
                    if not block_align or size == 0xFFFFFFFF:
                        return None
                    present = os.path.getsize(path) - f.tell()
                    return size // block_align, min(size, present) // block_align
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None


def load_audio_file(path: str, sample_rate: int) -> tuple[np.ndarray, list[str]]:
    """An audio file (WAV, FLAC, OGG, ...) -> (mono float32 waveform at ``sample_rate``, notes)."""
    if not os.path.exists(path):
        raise SkipClip("audio file not found: " + path)
    try:
        declared = _wav_declared_frames(path)
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors are many and plain
        raise SkipClip(f"unreadable audio: {str(e).strip() or type(e).__name__}") from e
    if declared and declared[1] < declared[0]:
        raise SkipClip(f"truncated audio: {declared[1]} of {declared[0]} declared samples on disk")
    if samples.shape[0] == 0:
        raise SkipClip("empty audio: 0 samples")
    notes: list[str] = []
    return _to_mono_resampled(samples, rate, sample_rate, notes), notes


def check_waveform(
    waveform: np.ndarray, sample_rate: int, min_samples: int, silence_threshold: float
) -> None:
    """Skips non-finite, too short and silent audio (peak amplitude below the threshold)."""
    if not np.isfinite(waveform).all():
        raise SkipClip(
            f"non-finite audio: {int((~np.isfinite(waveform)).sum())} samples are NaN or inf"
        )
    if len(waveform) < min_samples:
        raise SkipClip(
            f"audio too short: {len(waveform)} samples ({len(waveform) / sample_rate:.2f} s) "
            f"< {min_samples} samples, the training crop"
        )
    peak = float(np.abs(waveform).max())
    if peak < silence_threshold:
        raise SkipClip(f"silent audio: peak amplitude {peak:.2g} < {silence_threshold:g}")


def frame_paths(frames_dir: str, count: int) -> list[str]:
    """The ``count`` frame files 000001.jpg ... of a frames folder, checked to exist."""
    if not os.path.isdir(frames_dir):
        raise SkipClip("frames folder not found: " + frames_dir)
    paths = [os.path.join(frames_dir, f"{i:06d}.jpg") for i in range(1, count + 1)]
    present = sum(os.path.exists(p) for p in paths)
    if present < count:
        raise SkipClip(f"fewer frames than listed: {present} of {count} frame files present")
    return paths


def load_frame(path: str) -> np.ndarray:
    """One frame file -> uint8 RGB [H, W, 3]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as e:
        name = os.path.basename(path)
        raise SkipClip(f"unreadable frame: {name} ({str(e).strip() or type(e).__name__})") from e


# ---------------------------------------------------------------------------------------------
# Video files


def require_ffmpeg() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} is not on PATH; decoding video files needs it (Debian: apt install ffmpeg)"
            )


def _probe(path: str) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", path],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()
        raise SkipClip(f"unreadable video: {message[-1] if message else 'ffprobe failed'}")
    return json.loads(result.stdout)


def decode_video(
    path: str,
    frames_dir: str,
    *,
    sample_rate: int,
    fps: float,
    start_seconds: float | None = None,
    duration_seconds: float | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """A video file -> (mono float32 audio at ``sample_rate``, frame files at ``fps`` written to
    ``frames_dir`` as 000001.jpg..., notes). ``start_seconds``/``duration_seconds`` cut a segment
    out of a longer video.

    Raises :class:`SkipClip` for unreadable or truncated files and for files without an audio or
    a video stream.
    """
    if not os.path.exists(path):
        raise SkipClip("video file not found: " + path)
    info = _probe(path)
    kinds = {s.get("codec_type") for s in info.get("streams", [])}
    if "audio" not in kinds:
        raise SkipClip("no audio stream: the video has none")
    if "video" not in kinds:
        raise SkipClip("missing frames: the file has no video stream")
    waveform, notes = _decode_audio(path, info, sample_rate, start_seconds, duration_seconds)
    decoded = len(waveform) / sample_rate
    seek = ["-ss", f"{start_seconds:.3f}"] if start_seconds else []
    span = ["-t", f"{duration_seconds:.3f}"] if duration_seconds else []

    os.makedirs(frames_dir, exist_ok=True)
    frame_cmd = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        *seek,
        "-i",
        path,
        *span,
        "-an",
        "-vf",
        f"fps={fps}",
        "-q:v",
        "2",
        os.path.join(frames_dir, "%06d.jpg"),
    ]
    result = subprocess.run(frame_cmd, capture_output=True, check=False)
    frames = sorted(f for f in os.listdir(frames_dir) if f.endswith(".jpg"))
    if result.returncode != 0 or not frames:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise SkipClip(f"missing frames: {message[-1] if message else 'no frames decoded'}")
    expected_frames = int(np.floor(decoded * fps))
    if len(frames) < expected_frames - 1:
        raise SkipClip(
            f"truncated media: {len(frames)} frames for {decoded:.2f} s of audio at {fps:g} fps"
        )
    return waveform, [os.path.join(frames_dir, f) for f in frames], notes


def _decode_audio(
    path: str,
    info: dict,
    sample_rate: int,
    start_seconds: float | None,
    duration_seconds: float | None,
) -> tuple[np.ndarray, list[str]]:
    """The first audio stream of a probed media file -> (mono float32 at ``sample_rate``, notes),
    through ffmpeg; raises :class:`SkipClip` when it is unreadable or shorter than declared."""
    declared = float(info.get("format", {}).get("duration", "nan"))
    notes = []
    stream = next(s for s in info["streams"] if s.get("codec_type") == "audio")
    if int(stream.get("channels", 1)) > 1:
        notes.append(f"downmixed {stream['channels']} channels")
    if int(stream.get("sample_rate", sample_rate)) != sample_rate:
        notes.append(f"resampled from {stream['sample_rate']} Hz")
    seek = ["-ss", f"{start_seconds:.3f}"] if start_seconds else []
    span = ["-t", f"{duration_seconds:.3f}"] if duration_seconds else []

    audio_cmd = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        *seek,
        "-i",
        path,
        *span,
        "-vn",
        "-ac",
        "1",
        "-ar",
        str(sample_rate),
        "-f",
        "f32le",
        "-acodec",
        "pcm_f32le",
        "pipe:1",
    ]
    result = subprocess.run(audio_cmd, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise SkipClip(f"unreadable audio: {message[-1] if message else 'no samples decoded'}")
    waveform = np.frombuffer(result.stdout, np.float32).copy()

    expected = declared - (start_seconds or 0.0)
    if duration_seconds:
        expected = min(expected, duration_seconds)
    decoded = len(waveform) / sample_rate
    if np.isfinite(expected) and decoded < expected - max(0.5, 0.05 * expected):
        raise SkipClip(
            f"truncated media: decoded {decoded:.2f} s of audio, {expected:.2f} s declared"
        )
    return waveform, notes


def decode_audio_stream(
    path: str,
    sample_rate: int,
    *,
    start_seconds: float | None = None,
    duration_seconds: float | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The audio of any file ffmpeg reads (a video's audio track, M4A, ...) -> (mono float32
    waveform at ``sample_rate``, notes); ``start_seconds``/``duration_seconds`` cut a segment.

    Raises :class:`SkipClip` when ffmpeg or ffprobe is not on PATH (naming what installs them),
    and for missing, unreadable or truncated files and files without an audio stream.
    """
    if not os.path.exists(path):
        raise SkipClip("media file not found: " + path)
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise SkipClip(
            f"ffmpeg not found: decoding {os.path.splitext(path)[1] or 'such'} files needs "
            f"{' and '.join(missing)} on PATH (Debian: apt install ffmpeg)"
        )
    info = _probe(path)
    if "audio" not in {s.get("codec_type") for s in info.get("streams", [])}:
        raise SkipClip("no audio stream: the file has none")
    return _decode_audio(path, info, sample_rate, start_seconds, duration_seconds)
