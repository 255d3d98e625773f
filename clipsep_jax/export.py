r"""Package a trained model the way Hugging Face users expect, and optionally upload it.

    python -m clipsep_jax.export --workdir=runs/demo --output=models/demo [--checkpoint=best]
    python -m clipsep_jax.export --workdir=runs/demo --output=models/demo \
        --push_to_hub=USER/clipsep-demo [--private]

writes a pretrained folder (``clipsep_jax.checkpoints.save_pretrained``): ``config.json``, the
weights as ``model.safetensors``, the query encoder (bundled when it is a local folder, else its
hub id in the config) and a model card ``README.md`` with the training config, the data it saw
(when the dataset is at hand) and the run's newest evaluation table of that checkpoint. Load it
with ``Separator.from_pretrained(folder or hub id)``, or give it to ``separate``, ``evaluate``
and ``app`` as ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from clipsep_jax import checkpoints, errors, input_pipeline

__all__ = ["export", "main"]


def _dataset_facts(config: ml_collections.ConfigDict) -> dict:
    """What the card says about the training data, read from the prepared dataset if present."""
    try:
        source, metadata = input_pipeline.open_split(config.data, config.data.train_split)
    except (ValueError, OSError):
        return {"note": "the prepared dataset was not at hand when this card was written"}
    labels = list(metadata.get("labels", []))
    facts = {"training clips": len(source)}
    if labels:
        shown = ", ".join(labels[:20]) + (f", ... ({len(labels)} in all)" if len(labels) > 20
                                          else "")
        facts["labels"] = shown
    for key in ("clip", "resnet", "synth_clips_per_class", "synth_seconds", "synth_seed"):
        if key in metadata:
            facts[key] = metadata[key]
    return facts


def _evaluation_table(workdir: Path, step: int) -> str | None:
    """The newest evaluation table of checkpoint ``step`` in ``workdir/evaluation``."""
    tables = sorted((workdir / "evaluation").glob(f"*_step{step}.md"),
                    key=lambda p: p.stat().st_mtime)
    return tables[-1].read_text() if tables else None


def export(workdir: str | Path, output: str | Path, checkpoint: str = "best",
           overwrite: bool = False) -> Path:
    """Writes the pretrained folder of ``workdir``'s checkpoint (``best``, ``latest`` or a
    step) into ``output`` (an existing one only with ``overwrite``: its model files are
    replaced, other files kept); returns its path."""
    workdir = Path(workdir)
    step_arg: int | str = int(checkpoint) if checkpoint.isdigit() else checkpoint
    config, variables, step = checkpoints.load_workdir(workdir, step_arg)
    return checkpoints.save_pretrained(output, config, variables, step=step,
                                       evaluation=_evaluation_table(workdir, step),
                                       dataset=_dataset_facts(config), overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsep_jax.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run")
    parser.add_argument("--checkpoint", default="best", help="best | latest | a step")
    parser.add_argument("--output", required=True, help="the pretrained folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model files of an existing output folder (its other "
                        "files, e.g. a git clone's, are kept)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID",
                        help="also upload the folder to this Hugging Face repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    try:
        folder = export(args.workdir, args.output, args.checkpoint, args.overwrite)
        print(f"written: {folder}", flush=True)
        if args.push_to_hub:
            url = checkpoints.push_to_hub(folder, args.push_to_hub, private=args.private)
            print(f"uploaded: {url}", flush=True)
    except errors.USER_ERRORS as e:
        return errors.report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
