r"""Generate audio from text or image queries with a CLIPSonic model.

    python -m clipsep_jax.generate --workdir=RUN --text="a dog barking" [--text=...] \
        [--image=frame.jpg] [--num_samples=K] [--guidance=W] [--steps=S] [--seed=S] \
        [--seconds=D] [--prior=ridge|retrieval [--prior_split=SPLIT] |
         --prior=diffusion --prior_checkpoint=PRIOR_RUN] \
        [--vocoder=VOCODER_RUN | --vocoder=HIFIGAN_CHECKPOINT [--vocoder_config=config.json]] \
        --output-dir=DIR

writes ``DIR/<query made safe>_<k>.wav`` (16 kHz) and ``DIR/<query made safe>_<k>.png`` (its
log-mel) for each query and sample, and ``DIR/generation.json`` (the settings, and what made
the waveforms: Griffin-Lim or the vocoder). ``--checkpoint`` takes a pretrained
folder or hub id or a model directory in place of ``--workdir``. Existing files are refused
unless ``--overwrite``. ``--prior`` (CLIPSonic-PD) maps each text query's CLIP embedding to an
image embedding before generation, with a prior fitted on another split of the run's dataset
(``--prior_split``, default the run's ``clipsonic.prior.split``) or a trained diffusion prior
(``--prior=diffusion --prior_checkpoint``); without it, a run whose config names a prior uses
that one, and other text queries go in as they are (CLIPSonic-ZS). ``--vocoder`` turns the
log-mels into waveforms with a vocoder trained here (a run of model kind ``istft`` or
``hifigan``) or a HiFi-GAN generator checkpoint (the reference's layout and config.json; 22.05
kHz ones through resampling) instead of Griffin-Lim; its mel bands must be the model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipsep_jax import errors, inference
from clipsep_jax.families import get_family
from clipsep_jax.files import write_text_atomic, write_wav_atomic
from clipsep_jax.pictures import save_png, spectrogram_picture
from clipsep_jax.separate import query_file_name, read_image

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsep_jax.generate",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir: its latest checkpoint")
    source.add_argument("--checkpoint", help="pretrained folder or hub id, or model directory")
    parser.add_argument("--text", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="image query file")
    parser.add_argument("--num_samples", type=int, default=1, help="samples per query")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale w (1: conditional, 0: none)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each sample")
    parser.add_argument("--clip", help="the query encoder's hub id or folder")
    parser.add_argument("--prior", help="text -> image embedding prior for text queries "
                        "(CLIPSonic-PD: ridge, retrieval or diffusion; none: the text as it is)")
    parser.add_argument("--prior_split", help="the dataset split the prior is fitted on")
    parser.add_argument("--prior_checkpoint",
                        help="the diffusion prior (--prior=diffusion): a run of model kind "
                             "diffusion_prior (workdir or model directory) or LAION's file")
    parser.add_argument("--vocoder", help="a vocoder run (kind istft or hifigan) or a HiFi-GAN "
                        "generator checkpoint file (default: Griffin-Lim)")
    parser.add_argument("--vocoder_config", help="its config.json (default: beside it)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    args = parser.parse_args(argv)
    try:
        queries: list[Any] = list(args.text)
        names = list(args.text)
        for path in args.image:
            queries.append(read_image(path))
            names.append(f"image_{Path(path).stem}")
        if not queries:
            raise errors.UserError("no queries: give --text and/or --image")
        if args.prior_checkpoint and args.prior not in (None, "diffusion"):
            raise errors.UserError(f"--prior_checkpoint is for --prior=diffusion, not "
                                   f"--prior={args.prior}")
        if args.prior_split and args.prior == "diffusion":
            raise errors.UserError("--prior_split is for ridge and retrieval priors; the "
                                   "diffusion prior was trained on its own run's data")
        if args.vocoder_config and not (args.vocoder and Path(args.vocoder).is_file()):
            raise errors.UserError("--vocoder_config goes with a HiFi-GAN checkpoint file "
                                   "(--vocoder=FILE); a vocoder run carries its own config")
        config, variables = inference.load_for_inference(args.checkpoint or args.workdir)
        generator = get_family(config).generator(config, variables, encoder=args.clip)
        # A prior maps text queries only; "none" asks for them as they are (ZS) even when the
        # run's config names one.
        prior = (generator.use_prior(args.prior, args.prior_split, args.prior_checkpoint)
                 if args.text and args.prior != "none" else None)
        vocoder = (generator.use_vocoder(args.vocoder, args.vocoder_config) if args.vocoder
                   else "Griffin-Lim")
        out = Path(args.output_dir)
        taken: set[str] = set()
        stems = [query_file_name(name, taken) for name in names]
        planned = [out / f"{stem}_{k}.wav" for stem in stems for k in range(args.num_samples)]
        existing = [str(p) for p in planned if p.exists()]
        if existing and not args.overwrite:
            raise errors.UserError(f"{existing[0]} exists (and {len(existing) - 1} more); "
                                   "pass --overwrite or another --output-dir")
        results = generator.generate(queries, num_samples=args.num_samples,
                                     seconds=args.seconds, guidance=args.guidance,
                                     steps=args.steps, seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        rate = config.audio.sample_rate
        for stem, result in zip(stems, results, strict=True):
            for k, (wave, log_mel) in enumerate(zip(result["waveforms"], result["mels"],
                                                    strict=True)):
                path = write_wav_atomic(out / f"{stem}_{k}.wav", wave, rate)
                save_png(out / f"{stem}_{k}.png", spectrogram_picture(log_mel))
                print(f"written: {path} ({vocoder} waveform)", flush=True)
        write_text_atomic(out / "generation.json", json.dumps({
            "queries": names, "files": [str(p.name) for p in planned],
            "num_samples": args.num_samples, "guidance": args.guidance, "steps": args.steps,
            "seed": args.seed, "seconds": args.seconds, "sample_rate": rate,
            "waveforms": (f"{vocoder} from the generated log-mel" if args.vocoder else
                          "Griffin-Lim from the generated log-mel (no vocoder given)"),
            "prior": prior,
            "model": str(args.checkpoint or args.workdir)}, indent=1))
    except errors.USER_ERRORS as e:
        return errors.report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
