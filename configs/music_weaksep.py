"""The weakly supervised separator on MUSIC (Mahmud et al., ICLR 2024), as the released scripts
train it: mixtures of N = 2 mixtures of P = 2 solo clips of distinct instruments, captioned "The
sound mixture of A and B" with clauses "The sound of A", "The sound of B"; LAION's
``laion/larger_clap_music`` frozen (HTSAT-base + RoBERTa-base, the paper's CLAP architecture);
full-size U-Net; global batch 16, Adam 1e-4.

    python -m clipsep_jax.main --config=configs/music_weaksep.py[:MODE] --workdir=runs/music_weak \
        --config.data.data_dir=DATA

MODE: ``unsupervised`` (default; the paper's weak supervision: no clean source), ``supervised``
(URL on two-source mixtures of solo clips with their class prompts) or ``semi_supervised``
(both: ``weaksep.loss.supervised_weight`` x the supervised term + ``unsupervised_weight`` x the
weak loss; the paper's semi-supervised variant, absent from the reference's code).
Differences from the reference kept on purpose: the learning rate is constant (the reference
steps it down 10x every 15 epochs, whose length depends on its list files) and the weight decay
is AdamW's decoupled one when set (the reference's is Adam's coupled 1e-4).
"""

from clipsep_jax.config import default_config

MODES = ("unsupervised", "supervised", "semi_supervised")


def get_config(mode: str = "unsupervised"):
    if mode not in MODES:
        raise ValueError(f"configs/music_weaksep.py:{mode}: expected one of {', '.join(MODES)}")
    config = default_config("weaksep")
    config.data.name = "music"
    config.weaksep.mode = mode
    config.weaksep.num_mixtures = 2
    config.weaksep.clauses_per_mixture = 2
    config.weaksep.data.min_sources_per_mixture = 2
    config.train.batch_size = 16
    config.train.num_steps = 200_000
    config.train.checkpoint_every_steps = 5000
    config.train.validation_every_steps = 5000
    config.eval.after_training = True
    return config
