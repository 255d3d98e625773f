"""Weakly supervised language-conditioned separation with CLAP (Mahmud et al., ICLR 2024; the
reference is microsoft/BiModalAudioSeparation): model kind ``weaksep``.

- ``family``: the family interface (configuration, training, evaluation);
- ``frozen_clap``: the frozen CLAP a config names;
- ``data``: mixtures of mixtures with captions and clauses, and two-source test mixtures;
- ``model``: the text-queried network, the frozen CLAP's use and the losses of a batch;
- ``unet``: the conditional attention U-Net and the CLIPSep-style query head (Flax);
- ``losses``: the STFT front end, mixtures of mixtures, URL, CRL, CNT and their total;
- ``captions``: the rule-based caption splitter, clause selection and prompt templates;
- ``evaluation``: SDR / SIR / SAR of two-source test mixtures queried with text;
- ``separator``: separating recordings with text queries;
- ``convert`` and ``reference``: the reference's PyTorch checkpoints -> Flax variables;
- ``ablation``: URL only, URL + CRL and the full loss trained side by side.
"""

from typing import Any

__all__ = ["FAMILY", "load_frozen_clap"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the clap family imports this package's captions, and the family
    # module imports the clap family.
    if name in __all__:
        from clipsep_jax.families.weaksep import family, frozen_clap

        return family.FAMILY if name == "FAMILY" else frozen_clap.load_frozen_clap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
