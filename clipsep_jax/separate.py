r"""Separate recordings with text or image queries.

    python -m clipsep_jax.separate --checkpoint=MODEL_DIR --input mix.wav \
        --text "playing bagpipes" [--text ... | --image frame.jpg] --output-dir out/

writes ``out/<input stem>/<query>.wav`` for each query and ``out/<input stem>/residual.wav`` (what
no query took), at the input's sample rate, length and channel count. ``--input`` may be a folder
(every audio or video file in it). ``--checkpoint`` is a pretrained folder or Hugging Face hub id
(``Separator.save_pretrained``, ``python -m clipsep_jax.export``), a model directory
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from clipsep_jax import inference
from clipsep_jax.families import get_family
from clipsep_jax.files import staging_folder
from clipsep_jax.separation import SeparationError

__all__ = ["SeparationError", "read_audio", "read_image", "query_file_name", "main"]

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


def read_image(path: str | Path) -> np.ndarray:
    """An image query file -> uint8 RGB [H, W, 3]; SeparationError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as e:
        raise SeparationError(f"{Path(path).name if isinstance(path, Path) else path}: cannot "
                              f"read the image ({e})") from e


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


# Every output folder this command writes holds this file, listing the files it wrote: a folder
# without it is not ours, and is never replaced.
MANIFEST = ".clipsep-separate.json"


def output_names(names: Sequence[str]) -> list[str]:
    """File stems for the queries' display names, unique and never "residual", then
    "residual" (the order of :meth:`Separator.separate_in_order`'s outputs)."""
    taken = {"residual"}
    return [query_file_name(name, taken) for name in names] + ["residual"]


def output_folders(inputs: Sequence[str], root: str | None, output_dir: str) -> dict[str, Path]:
    """Each input's output folder: ``output_dir/<relative folder>/<stem>``, relative to the
    input folder ``root`` (None: a single file); inputs whose folders would coincide (``a.wav``
    and ``a.flac``) get ``<stem>_<extension>``."""
    relative = {path: Path(path).relative_to(root) if root else Path(Path(path).name)
                for path in inputs}
    plain = {path: rel.parent / rel.stem for path, rel in relative.items()}
    counts: dict[Path, int] = {}
    for folder in plain.values():
        counts[folder] = counts.get(folder, 0) + 1
    out, taken = {}, set()
    for path, rel in relative.items():
        folder = plain[path]
        if counts[folder] > 1:
            folder = rel.parent / f"{rel.stem}_{rel.suffix.lstrip('.').lower() or 'file'}"
        unique, number = folder, 2
        while str(unique).lower() in taken:  # e.g. a_wav.ogg beside a.wav and a.flac
            unique, number = folder.parent / f"{folder.name}_{number}", number + 1
        taken.add(str(unique).lower())
        out[path] = Path(output_dir) / unique
    return out


def _write_outputs(folder: Path, outputs: dict[str, np.ndarray], rate: int,
                   overwrite: bool = False) -> None:
    """Writes ``outputs`` ({file stem: waveform}) as ``folder/<stem>.wav`` through a temporary
    folder. An existing ``folder`` is refused unless it holds this command's manifest and
    ``overwrite`` is set; then only the files that manifest lists are replaced."""
    old_files: list[str] = []
    if folder.exists() or folder.is_symlink():
        manifest = folder / MANIFEST
        if not folder.is_dir() or not manifest.is_file():
            raise SeparationError(f"{folder}: exists and was not written by "
                                  "clipsep_jax.separate; choose another --output-dir")
        if not overwrite:
            raise SeparationError(f"{folder}: exists (an earlier separation); --overwrite "
                                  "replaces its outputs")
        try:
            old_files = list(json.loads(manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise SeparationError(f"{manifest}: unreadable ({e}); not replacing {folder}") from e
        foreign = [f"{stem}.wav" for stem in outputs if f"{stem}.wav" not in old_files
                   and (folder / f"{stem}.wav").exists()]
        if foreign:
            raise SeparationError(f"{folder}: {', '.join(foreign)} was not written by "
                                  "clipsep_jax.separate; not replacing it")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_folder(folder, prefix=f".tmp-{folder.name}-")
    except OSError as e:
        raise SeparationError(f"{folder.parent}: cannot write there ({e.strerror})") from e
    try:
        files = [f"{stem}.wav" for stem in outputs]
        for stem, wave in outputs.items():
            soundfile.write(tmp / f"{stem}.wav", wave, rate, subtype="FLOAT")
        (tmp / MANIFEST).write_text(json.dumps({"files": files}))
        if not old_files:
            os.replace(tmp, folder)
            return
        # New files in first, then the old ones no longer listed: a failure midway leaves every
        # output of one run or the other in place.
        for name in [*files, MANIFEST]:
            os.replace(tmp / name, folder / name)
        for name in old_files:
            if Path(name).name == name and name not in (*files, MANIFEST):  # plain names only
                (folder / name).unlink(missing_ok=True)
        tmp.rmdir()
    except (OSError, soundfile.SoundFileRuntimeError) as e:  # a full disk, among others
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e)
        free = shutil.disk_usage(folder.parent).free
        raise SeparationError(f"{folder}: cannot write the outputs ({reason}; {free:,} bytes "
                              "free there)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipsep_jax.separate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pretrained folder or hub id (owner/name), model "
                        "directory, or reference .pt file")
    source.add_argument("--workdir", help="training workdir: its latest checkpoint")
    parser.add_argument("--model_kind",
                        help="kind of a reference .pt (clipsep, clipsep_nit, sop, bertsep)")
    parser.add_argument("--input", required=True, help="audio/video file, or a folder of them")
    parser.add_argument("--text", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--image", action="append", default=[],
                        help="image query: a picture file (repeatable)")
    parser.add_argument("--output-dir", required=True, help="where <stem>/<query>.wav go")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier separation (only the files it "
                             "wrote; other folders are never touched)")
    parser.add_argument("--clip", help="the query encoder's hub id, folder or file: CLIP, or "
                        "SOP's ResNet, or BERTSep's BERT (default: the config's)")
    parser.add_argument("--channels", default="each", choices=("each", "downmix"),
                        help="separate each channel, or their mean (written to every channel)")
    parser.add_argument("--window_frames", type=int, default=None,
                        help="STFT frames per model window (default: the model's; CLIPSep "
                             "4096, about 65 s; weaksep its training crop)")
    parser.add_argument("--overlap_frames", type=int, default=None,
                        help="frames shared and cross-faded by neighbouring windows (default: "
                             "the model's; CLIPSep 256, weaksep a quarter window)")
    args = parser.parse_args(argv)
    try:
        queries: list[Any] = []
        for text in args.text:
            if not text.strip():
                raise SeparationError("--text: empty query")
            queries.append(text)
        names = list(args.text)
        for image_path in args.image:
            queries.append(read_image(image_path))
            names.append(f"image_{Path(image_path).stem}")
        if not queries:
            raise SeparationError("no queries: give --text and/or --image")
        stems = output_names(names)
        for name, stem in zip(names, stems, strict=False):
            if stem != name:
                print(f"query {name!r} -> {stem}.wav", flush=True)
        inputs, root = _input_files(args.input, args.output_dir)
        folders = output_folders(inputs, root, args.output_dir)
        try:
            config, variables = inference.load_for_inference(args.checkpoint or args.workdir,
                                                             args.model_kind)
        except (ValueError, OSError) as e:  # the message names the file and the problem
            raise SeparationError(str(e)) from e
        windows = {k: v for k, v in (("window_frames", args.window_frames),
                                     ("overlap_frames", args.overlap_frames)) if v is not None}
        separator = get_family(config).separator(config, variables, clip=args.clip, **windows)
        separator.check_queries(queries)
        _check_output_dir(Path(args.output_dir))
    except SeparationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = []
    for path in tqdm(inputs, unit="file", disable=len(inputs) < 2, file=sys.stderr):
        try:
            waveform, rate = read_audio(path)
            outputs = separator.separate_in_order(waveform, rate, queries,
                                                  channels=args.channels)
            folder = folders[path]
            _write_outputs(folder, dict(zip(stems, outputs, strict=True)), rate, args.overwrite)
            print(f"{path} -> {folder}/ ({', '.join(f'{s}.wav' for s in stems)})", flush=True)
        except SeparationError as e:
            failed.append(path)
            message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            print(f"error: {message}", file=sys.stderr, flush=True)
    if len(inputs) > 1 or failed:
        print(f"{len(inputs) - len(failed)} of {len(inputs)} files separated"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 2 if failed else 0


def _check_output_dir(folder: Path) -> None:
    """Refuses, before any work, an output folder that cannot be created or written."""
    if folder.exists() and not folder.is_dir():
        raise SeparationError(f"--output-dir {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SeparationError(f"--output-dir {folder}: cannot create it ({e.strerror})") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeparationError(f"--output-dir {folder}: not writable")


def _input_files(path: str, output_dir: str) -> tuple[list[str], str | None]:
    """(the audio and video files to separate, the input folder or None for one file); files
    under ``output_dir`` are left out (earlier outputs inside the input folder)."""
    p = Path(path)
    if p.is_dir():
        out = Path(output_dir).resolve()
        files = sorted(str(f) for f in p.rglob("*")
                       if f.suffix.lower() in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS
                       and f.is_file() and out not in f.resolve().parents)
        if not files:
            raise SeparationError(f"{path}: no audio or video files in this folder")
        return files, str(p)
    if not p.exists():
        raise SeparationError(f"{path}: no such file or folder")
    return [str(p)], None


if __name__ == "__main__":
    sys.exit(main())
