r"""A local web page for separating recordings with text and image queries (Gradio).

    python -m clipsep_jax.app --workdir=runs/demo            # a training run's latest checkpoint
    python -m clipsep_jax.app --checkpoint=MODEL [--host 127.0.0.1 --port 7860]

``--checkpoint`` takes what ``separate`` takes: a pretrained folder or Hugging Face hub id, a
model directory, or a reference checkpoint (with ``--model_kind``). The page: upload or record a
recording (any format ``separate`` reads), give one or more text queries (one per line) and
optional image queries, press *Separate*; each separated source and the residual play in the page
and download as WAV (the input's rate and channels), beside pictures of the mixture's spectrogram
and of each query's mask. Long recordings show a progress bar. Bad input (an unreadable file, an
empty query, a query the model cannot take) shows the same message ``separate`` prints, and the
server keeps serving. Needs the ``[app]`` extra (``pip install -e '.[app]'``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

from clipsep_jax import inference
from clipsep_jax.families import get_family
from clipsep_jax.pictures import spectrogram_picture
from clipsep_jax.separate import output_names, read_audio, read_image
from clipsep_jax.separation import SeparationError

__all__ = ["MAX_QUERIES", "MAX_SAMPLES", "SeparationPage", "GenerationPage", "build_app",
           "build_generation_app", "main"]

MAX_QUERIES = 8  # output slots on the page
KEEP_SEPARATIONS = 32  # request folders kept on disk (older ones are removed)
MAX_UPLOAD = "500mb"
MAX_SAMPLES = 4  # generated samples shown per request
_PICTURE_WIDTH = 1200  # pixels; longer spectrograms are shrunk in time for the page


class SeparationPage:
    """What the page does, without Gradio: queries and files in, output files and pictures out
    (so the logic is testable and the page stays a thin layout).

    Args:
        separator: the family's separator (``check_queries``, ``separate_detailed``).
        output_root: where each request's outputs go (one new folder per request).
    """

    def __init__(self, separator: Any, output_root: str | Path):
        self.separator = separator
        self.output_root = Path(output_root)
        self.output_root.mkdir(parents=True, exist_ok=True)

    def queries(self, text: str, image_paths: Sequence[str] | None) -> tuple[list[Any],
                                                                             list[str]]:
        """(queries, their names): the non-empty lines of ``text``, then the images."""
        queries: list[Any] = []
        names: list[str] = []
        for line in (text or "").splitlines():
            if line.strip():
                queries.append(line.strip())
                names.append(line.strip())
        for path in image_paths or []:
            queries.append(read_image(Path(path)))
            names.append(f"image_{Path(path).stem}")
        if not queries:
            raise SeparationError("no queries: give at least one text query (one per line) or "
                                  "an image")
        if len(queries) > MAX_QUERIES:
            raise SeparationError(f"{len(queries)} queries: the page shows at most "
                                  f"{MAX_QUERIES}")
        return queries, names

    def run(self, audio_path: str | None, text: str, image_paths: Sequence[str] | None = None,
            channels: str = "each", progress: Any = None) -> dict:
        """Separates one recording -> {"names": [...], "files": [one WAV per query, then the
        residual], "pictures": [(PNG path, caption)], "seconds": float}; raises
        SeparationError with the message ``separate`` would print."""
        if not audio_path:
            raise SeparationError("no recording: upload or record one first")
        queries, names = self.queries(text, image_paths)
        self.separator.check_queries(queries)
        try:
            waveform, rate = read_audio(str(audio_path))
        except SeparationError as e:  # name the file as the user knows it, not Gradio's copy
            raise SeparationError(str(e).replace(str(audio_path), Path(audio_path).name)) from e
        start = time.perf_counter()
        result = self.separator.separate_detailed(waveform, rate, queries, channels=channels,
                                                  progress=progress)
        seconds = time.perf_counter() - start
        self._forget_old_separations()
        folder = Path(tempfile.mkdtemp(prefix="separation-", dir=self.output_root))
        stems = output_names(names)  # the queries' file stems, then "residual"
        files = []
        for stem, wave in zip(stems, result.outputs, strict=True):
            path = folder / f"{stem}.wav"
            soundfile.write(path, wave, rate, subtype="FLOAT")
            files.append(str(path))
        pictures = [(self._picture(folder / "mixture.png",
                                   spectrogram_picture(np.log1p(result.mixture))),
                     "mixture (log frequency)")]
        for stem, name, mask in zip(stems[:-1], names, result.masks, strict=True):
            pictures.append((self._picture(folder / f"mask_{stem}.png",
                                           spectrogram_picture(mask, (0.0, 1.0))),
                             f"mask: {name}"))
        return {"names": names, "files": files, "pictures": pictures, "seconds": seconds,
                "duration": len(waveform) / rate}

    def _forget_old_separations(self) -> None:
        """Keeps the newest ``KEEP_SEPARATIONS`` request folders of this page (a server that
        runs for days does not fill its disk); nothing else in ``output_root`` is touched."""
        folders = sorted(self.output_root.glob("separation-*"), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - KEEP_SEPARATIONS + 1)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _picture(path: Path, picture: np.ndarray) -> str:
        image = Image.fromarray(picture)
        height, width = picture.shape[:2]
        scale = 2 if width * 2 <= _PICTURE_WIDTH else 1
        new_width = min(width * scale, _PICTURE_WIDTH)
        image = image.resize((new_width, height * 2), Image.Resampling.BILINEAR)
        image.save(path, format="PNG")
        return str(path)


class GenerationPage:
    """What the generation tab does, without Gradio: a text or image query in, WAVs and mel
    pictures out (one folder per request under ``output_root``).

    Args:
        generator: the family's generator (``generate(queries, num_samples=, seconds=,
            guidance=, steps=, seed=)``).
    """

    def __init__(self, generator: Any, output_root: str | Path, sample_rate: int = 16000):
        self.generator = generator
        self.output_root = Path(output_root)
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate

    def run(self, text: str, image_path: str | None, guidance: float, num_samples: int,
            seed: int, seconds: float = 4.0, steps: int = 50) -> dict:
        """-> {"files": [WAV per sample], "pictures": [(PNG, caption)], "query": name};
        raises UserError for a missing or bad query or setting."""
        if text and text.strip() and image_path:
            raise SeparationError("give a text query or an image, not both")
        if text and text.strip():
            query: Any = text.strip()
            name = query
        elif image_path:
            query = read_image(Path(image_path))
            name = f"image_{Path(image_path).stem}"
        else:
            raise SeparationError("no query: give a text query or an image")
        if not 1 <= int(num_samples) <= MAX_SAMPLES:
            raise SeparationError(f"samples={num_samples}: choose 1 to {MAX_SAMPLES}")
        result = self.generator.generate([query], num_samples=int(num_samples),
                                         seconds=float(seconds), guidance=float(guidance),
                                         steps=int(steps), seed=int(seed))[0]
        for old in sorted(self.output_root.glob("generation-*"),
                          key=lambda p: p.stat().st_mtime)[:-KEEP_SEPARATIONS + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="generation-", dir=self.output_root))
        stem = output_names([name])[0]
        files, pictures = [], []
        for k, (wave, log_mel) in enumerate(zip(result["waveforms"], result["mels"],
                                                strict=True)):
            path = folder / f"{stem}_{k}.wav"
            soundfile.write(path, wave, self.sample_rate, subtype="FLOAT")
            files.append(str(path))
            pictures.append((SeparationPage._picture(folder / f"{stem}_{k}.png",
                                                     spectrogram_picture(log_mel)),
                             f"sample {k} (log-mel)"))
        return {"files": files, "pictures": pictures, "query": name}


def build_generation_app(page: GenerationPage, title: str) -> Any:
    """The Gradio page of a generator (CLIPSonic): a text or image query, guidance, samples,
    seed; the samples (Griffin-Lim waveforms) and their log-mels."""
    import gradio as gr  # the [app] extra; only the page needs it

    def generate(text, image_path, guidance, num_samples, seed, seconds):
        try:
            result = page.run(text, image_path, guidance, num_samples, seed, seconds)
        except (SeparationError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from e
        audio = [gr.Audio(value=f, visible=True, label=f"{result['query']} #{k}")
                 for k, f in enumerate(result["files"])]
        audio += [gr.Audio(value=None, visible=False)] * (MAX_SAMPLES - len(audio))
        return [*audio, result["pictures"],
                f"Generated {len(result['files'])} sample(s) for {result['query']!r} "
                "(waveforms by Griffin-Lim; no neural vocoder yet)."]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nGenerate audio from a text query or a picture.")
        with gr.Tab("Generate"), gr.Row():
            with gr.Column():
                text = gr.Textbox(label="text query", elem_id="gen_text")
                image = gr.Image(label="or an image query", type="filepath",
                                 elem_id="gen_image")
                guidance = gr.Slider(0, 10, value=3, step=0.5, label="guidance",
                                     elem_id="gen_guidance")
                samples = gr.Slider(1, MAX_SAMPLES, value=2, step=1, label="samples")
                seed = gr.Number(value=0, precision=0, label="seed")
                seconds = gr.Slider(0.5, 10, value=4, step=0.5, label="seconds")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                status = gr.Markdown(elem_id="gen_status")
                outputs = [gr.Audio(visible=False, interactive=False, buttons=["download"],
                                    elem_id=f"sample_{i}") for i in range(MAX_SAMPLES)]
                pictures = gr.Gallery(label="log-mel spectrograms", columns=2,
                                      object_fit="contain", height=360)
        button.click(generate, [text, image, guidance, samples, seed, seconds],
                     [*outputs, pictures, status])
    return demo


def build_app(page: SeparationPage, title: str) -> Any:
    """The Gradio page around ``page``."""
    import gradio as gr  # the [app] extra; only the page needs it

    def separate(audio_path, text, image_files, channels, progress=gr.Progress()):  # noqa: B008
        progress(0.0, desc="separating")
        try:
            images = [getattr(f, "name", f) for f in (image_files or [])]
            result = page.run(audio_path, text, images, channels,
                              progress=lambda fraction: progress(fraction, desc="separating"))
        except SeparationError as e:
            raise gr.Error(str(e), print_exception=False) from e
        count = len(result["names"])
        audio_updates = []
        for slot in range(MAX_QUERIES):
            if slot < count:
                audio_updates.append(gr.Audio(value=result["files"][slot], visible=True,
                                              label=result["names"][slot]))
            else:
                audio_updates.append(gr.Audio(value=None, visible=False))
        status = (f"Separated {result['duration']:.1f} s of audio into {count} "
                  f"source{'s' if count > 1 else ''} and the residual in "
                  f"{result['seconds']:.1f} s.")
        return [*audio_updates, gr.Audio(value=result["files"][-1], visible=True),
                result["pictures"], status]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload or record a recording, give what to take out of it "
                    "(text, one query per line, and/or pictures), and press **Separate**.")
        with gr.Row():
            with gr.Column():
                mixture = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                   label="recording", elem_id="mixture")
                queries = gr.Textbox(label="text queries (one per line)", lines=3,
                                     placeholder="acoustic guitar\nviolin", elem_id="queries")
                images = gr.File(label="image queries (optional)", file_count="multiple",
                                 file_types=["image"], elem_id="images")
                channels = gr.Radio(["each", "downmix"], value="each",
                                    label="stereo: separate each channel, or their mean",
                                    elem_id="channels")
                button = gr.Button("Separate", variant="primary", elem_id="separate")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                outputs = [gr.Audio(visible=False, interactive=False, buttons=["download"],
                                    elem_id=f"output_{i}") for i in range(MAX_QUERIES)]
                residual = gr.Audio(label="residual (what no query took)", visible=False,
                                    interactive=False, buttons=["download"], elem_id="residual")
                pictures = gr.Gallery(label="mixture spectrogram and masks", columns=2,
                                      object_fit="contain", height=420, elem_id="pictures")
        button.click(separate, [mixture, queries, images, channels],
                     [*outputs, residual, pictures, status])
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsep_jax.app",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir: its latest checkpoint")
    source.add_argument("--checkpoint", help="pretrained folder or hub id, model directory, "
                        "or reference .pt file (with --model_kind)")
    parser.add_argument("--model_kind", help="kind of a reference .pt")
    parser.add_argument("--clip", help="the query encoder's hub id or folder (default: the "
                        "config's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--output_dir", default=None,
                        help="where separations are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401 (checked before the model loads)
    except ImportError:
        print("error: the web page needs Gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    path = args.checkpoint or args.workdir
    output_root = Path(args.output_dir or tempfile.mkdtemp(prefix="clipsep-app-"))
    title = ""
    try:
        config, variables = inference.load_for_inference(path, args.model_kind)
        title = f"clipsep-jax: {config.model.kind} ({Path(str(path)).name})"
        family = get_family(config)
        if family.task == "generation":  # a generator: the generation page
            generator = family.generator(config, variables, encoder=args.clip)
            demo = build_generation_app(
                GenerationPage(generator, output_root, config.audio.sample_rate), title)
            return _serve(demo, args, path, output_root)
        separator = family.separator(config, variables, clip=args.clip)
        separator.check_queries(["a"] if config.query.mode != "image" else
                                [np.zeros((8, 8, 3), np.uint8)])  # loads the query encoder
    except (ValueError, OSError) as e:  # the message names the file and the problem
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _serve(build_app(SeparationPage(separator, output_root), title), args, path,
                  output_root)


def _serve(demo: Any, args: argparse.Namespace, path: str, output_root: Path) -> int:
    print(f"serving {path} on http://{args.host}:{args.port}", flush=True)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=True, share=False,
        allowed_paths=[str(output_root)], max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
