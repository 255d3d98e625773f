"""Weakly supervised language-conditioned separation with CLAP (Mahmud et al., ICLR 2024; the
reference is microsoft/BiModalAudioSeparation).

- ``unet``: the conditional attention U-Net and the CLIPSep-style query head (Flax);
- ``convert``: the reference's PyTorch state dicts -> Flax variables;
- ``losses``: the STFT front end, mixtures of mixtures, URL, CRL, CNT and their total;
- ``captions``: the rule-based caption splitter, clause selection and prompt templates.
"""
