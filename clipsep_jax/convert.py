"""Convert a checkpoint of an original implementation into a model directory.

    python -m clipsep_jax.convert --checkpoint=best_model.pt --model_kind=clipsep_nit --output=DIR

The model kind's family reads the file (CLIPSep's: :mod:`clipsep_jax.families.clipsep.convert`,
a sony/CLIPSep PyTorch state dict read with ``weights_only``) and refuses missing, unexpected or
mis-shaped keys by name; the result is written with :func:`clipsep_jax.checkpoints.save_model`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from clipsep_jax import checkpoints
from clipsep_jax.families import all_kinds, family_of_kind

__all__ = ["load_reference_checkpoint", "main"]


def load_reference_checkpoint(
    path: str | Path, model_kind: str
) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a reference checkpoint -> (config at the checkpoint's sizes, Flax variables).

    Args:
      path: for CLIPSep's kinds, a ``.pt``/``.pth`` state dict saved by the reference's training
        script (with or without DataParallel's ``module.`` prefix).
      model_kind: e.g. ``clipsep``, ``clipsep_nit``, ``pit``, ``labelsep``.
    """
    return family_of_kind(model_kind).load_reference_checkpoint(path, model_kind)


def __getattr__(name: str) -> Any:
    # Old home of CLIPSep's converter internals (key_table, infer_config, ...): served from the
    # family's module on demand.
    from clipsep_jax.families.clipsep import convert

    try:
        return getattr(convert, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipsep_jax.convert",
        description="Convert a reference checkpoint (e.g. sony/CLIPSep's PyTorch state dict) "
                    "to a model directory.",
    )
    parser.add_argument("--checkpoint", required=True, help="the reference file (.pt/.pth)")
    parser.add_argument("--model_kind", required=True, choices=all_kinds())
    parser.add_argument("--output", required=True, help="directory to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        config, variables = load_reference_checkpoint(args.checkpoint, args.model_kind)
        checkpoints.save_model(args.output, config, variables)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables.get("params", {})))
    description = family_of_kind(args.model_kind).describe_model(config)
    print(f"wrote {args.output}: {description}, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
