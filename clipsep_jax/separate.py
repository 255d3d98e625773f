r"""Separate recordings with text or image queries.

    python -m clipsep_jax.separate --checkpoint=MODEL_DIR --input mix.wav \
        --text "playing bagpipes" [--text ... | --image frame.jpg] --output-dir out/

writes ``out/<input stem>/<query>.wav`` for each query and ``out/<input stem>/residual.wav`` (what
no query took), at the input's sample rate, length and channel count. ``--input`` may be a folder
(every audio or video file in it). ``--checkpoint`` is a model directory
(``clipsep_jax.checkpoints.save_model`` / ``clipsep_jax.convert``) or a reference PyTorch
checkpoint (with ``--model_kind``); ``--workdir`` takes the latest checkpoint of a training run.

In Python::

    separator = Separator.from_checkpoint("models/nit")
    outputs = separator.separate(waveform, sample_rate, ["playing bagpipes"])

Any length: the model runs on windows of ``window_frames`` STFT frames overlapping by
``overlap_frames``, their mask probabilities blended with linear cross-fades, then thresholded
at 0.5 and applied to the whole recording's STFT, inverted once (no seams). Another sample
rate is resampled to 16 kHz and back; stereo is separated per channel or downmixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from clipsep_jax import inference
from clipsep_jax.families import get_family
from clipsep_jax.separation import SeparationError

__all__ = ["SeparationError", "read_audio", "query_file_name", "main"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def __getattr__(name: str) -> Any:
    # The old home of CLIPSep's Separator; imported on demand so that this command's module
    # does not load a model family it is not asked for.
    if name == "Separator":
        from clipsep_jax.families.clipsep.separator import Separator

        return Separator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """An audio or video file -> (float32 [samples, channels], sample rate)."""
    path = str(path)
    if not os.path.isfile(path):
        raise SeparationError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS:
        raise SeparationError(
            f"{path}: unknown format {ext or '(no extension)'}; expected one of "
            f"{', '.join(AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)}")
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return data, rate
    except Exception as sf_error:  # not something libsndfile reads: try ffmpeg
        if shutil.which("ffprobe") is None:
            raise SeparationError(f"{path}: cannot read audio ({sf_error})") from sf_error
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
         "stream=channels,sample_rate", "-of", "json", path],
        capture_output=True, text=True, check=False)
    streams = json.loads(probe.stdout or "{}").get("streams", []) if probe.returncode == 0 else []
    if not streams:
        raise SeparationError(f"{path}: cannot read audio (no audio stream ffmpeg can decode)")
    channels, rate = int(streams[0]["channels"]), int(streams[0]["sample_rate"])
    decoded = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-vn", "-f", "f32le", "-acodec",
         "pcm_f32le", "-ac", str(channels), "-ar", str(rate), "pipe:1"],
        capture_output=True, check=False)
    if decoded.returncode != 0:
        raise SeparationError(f"{path}: cannot read audio ({decoded.stderr.decode()[-200:]})")
    return np.frombuffer(decoded.stdout, np.float32).reshape(-1, channels).copy(), rate


def query_file_name(query: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a query (letters, digits, '.', '-', '_')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", query.strip()).strip("._") or "query"
    stem = stem[:100]
    if stem == "residual":
        stem = "residual_query"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _write_outputs(folder: Path, outputs: dict[str, np.ndarray], rate: int) -> None:
    """Writes every output into a temporary folder, then renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        taken: set[str] = set()
        for name, wave in outputs.items():
            stem = "residual" if name == "residual" else query_file_name(name, taken)
            soundfile.write(tmp / f"{stem}.wav", wave, rate, subtype="FLOAT")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipsep_jax.separate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model directory or reference .pt file")
    source.add_argument("--workdir", help="training workdir: its latest checkpoint")
    parser.add_argument("--model_kind", help="kind of a reference .pt (clipsep, clipsep_nit)")
    parser.add_argument("--input", required=True, help="audio/video file, or a folder of them")
    parser.add_argument("--text", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--image", action="append", default=[],
                        help="image query: a picture file (repeatable)")
    parser.add_argument("--output-dir", required=True, help="where <stem>/<query>.wav go")
    parser.add_argument("--clip", help="CLIP hub id or folder (default: the config's)")
    parser.add_argument("--channels", default="each", choices=("each", "downmix"),
                        help="separate each channel, or their mean (written to every channel)")
    parser.add_argument("--window_frames", type=int, default=4096,
                        help="STFT frames per model window (4096: about 65 s)")
    parser.add_argument("--overlap_frames", type=int, default=256,
                        help="frames shared and cross-faded by neighbouring windows")
    args = parser.parse_args(argv)
    try:
        queries: list[Any] = []
        for text in args.text:
            if not text.strip():
                raise SeparationError("--text: empty query")
            queries.append(text)
        names = list(args.text)
        for image_path in args.image:
            try:
                with Image.open(image_path) as image:
                    queries.append(np.asarray(image.convert("RGB")))
            except Exception as e:
                raise SeparationError(f"{image_path}: cannot read the image ({e})") from e
            names.append(f"image_{Path(image_path).stem}")
        if not queries:
            raise SeparationError("no queries: give --text and/or --image")
        try:
            config, variables = inference.load_for_inference(args.checkpoint or args.workdir,
                                                             args.model_kind)
        except (ValueError, OSError) as e:  # the message names the file and the problem
            raise SeparationError(str(e)) from e
        separator = get_family(config).separator(
            config, variables, clip=args.clip, window_frames=args.window_frames,
            overlap_frames=args.overlap_frames)
        inputs = _input_files(args.input)
        for path in tqdm(inputs, unit="file", disable=len(inputs) < 2, file=sys.stderr):
            waveform, rate = read_audio(path)
            outputs = separator.separate(waveform, rate, queries, channels=args.channels)
            outputs = {names[i] if i < len(names) else k: v
                       for i, (k, v) in enumerate(outputs.items())}
            folder = Path(args.output_dir) / Path(path).stem
            _write_outputs(folder, outputs, rate)
            print(f"{path} -> {folder}/ ({', '.join(sorted(outputs))})", flush=True)
    except SeparationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _input_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*")
                       if f.suffix.lower() in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)
        if not files:
            raise SeparationError(f"{path}: no audio or video files in this folder")
        return files
    if not p.exists():
        raise SeparationError(f"{path}: no such file or folder")
    return [str(p)]


if __name__ == "__main__":
    sys.exit(main())
