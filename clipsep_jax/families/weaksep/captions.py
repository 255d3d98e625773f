"""Text side of the weakly supervised separator: the reference's rule-based caption splitter
(AudioCaps captions -> clause prompts), the per-step choice of P clauses, and the prompt templates
of the single-label datasets (MUSIC, VGGSound).

The splitter reproduces the reference's ``preprocessing/audiocaps/parser.py`` behaviour, quirks
included: case-sensitive substring splits, ``str.capitalize`` lower-casing everything after the
first character, "then" deleted inside words ("strengthen" -> "streng"), no de-duplication.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Split in this order; the spaces are part of each connective (three have no trailing space).
CONNECTIVES = (
    " and is followed by", " followed by ", " after which", " which is ", " proceeded by ",
    " at a close distance", " and ", ", ", " as ", " while ", " then ", " with ", " before ",
    " after ", " during ", " nearby ", " over ", " among ", " precedes ", " proceeded ",
    " which ",
)
# A fragment containing any of these anywhere is not split on " and " (on no other connective).
PROTECTED_PHRASES = (
    "on and off", "man and woman", "and is", "bells and a horn", "clanking and clunking",
    "and continuously",
)


def _nonempty_stripped(fragments: Sequence[str]) -> list[str]:
    return [f.strip() for f in fragments if f.strip()]


def split_caption(caption: str) -> list[str]:
    """A caption's clauses, left to right, as the reference's offline parser writes them.

    1. Split every fragment on each connective of :data:`CONNECTIVES` in turn (plain,
       case-sensitive ``str.split``); on " and " fragments containing a protected phrase stay.
    2. Strip and drop empty fragments; delete every "then " then every "then", and all commas.
    3. ``str.capitalize`` (first character upper-case, the rest lower-case), strip, drop empty.
    4. Delete every "And ", capitalize again, strip; finally drop empty fragments.

    Returns [] for an empty caption; repeated clauses are kept.
    """
    fragments = [caption]
    for connective in CONNECTIVES:
        split = []
        for fragment in fragments:
            if connective == " and " and any(p in fragment for p in PROTECTED_PHRASES):
                split.append(fragment)
            else:
                split.extend(fragment.split(connective))
        fragments = split
    fragments = _nonempty_stripped(fragments)
    fragments = [f.replace("then ", "").replace("then", "").replace(",", "") for f in fragments]
    fragments = _nonempty_stripped(f.capitalize() for f in fragments if f.strip())
    fragments = [f.replace("And ", "").capitalize().strip() for f in fragments]
    return _nonempty_stripped(fragments)


def choose_clauses(clauses: Sequence[str], count: int, rng: np.random.Generator, *,
                   pad_with_duplicates: bool = True) -> tuple[list[str], list[float], list[bool]]:
    """The ``count`` (P) clause prompts of one constituent for one training step.

    Exactly P clauses: all, in order. More: P drawn without replacement (random order). Fewer:
    the clauses in order, then

    - ``pad_with_duplicates`` (the reference): P - len randomly chosen clauses (with replacement);
      every copy of a clause weighs 1 / (its number of copies), so the CRL's weighted mask sum
      counts each clause once. The copies are also duplicate positives in the CNT
      (:func:`clipsep_jax.families.weaksep.losses.contrastive_loss`);
    - otherwise: empty prompts of weight 0, marked invalid.

    Returns:
      (prompts [P], weights [P], valid [P]).
    Raises:
      ValueError: for no clauses at all (the reference's loader fails on such a caption).
    """
    if not clauses:
        raise ValueError("choose_clauses: the caption has no clauses")
    clauses = list(clauses)
    if len(clauses) >= count:
        chosen = (clauses if len(clauses) == count
                  else [clauses[i] for i in rng.choice(len(clauses), count, replace=False)])
        return chosen, [1.0] * count, [True] * count
    extra = count - len(clauses)
    if not pad_with_duplicates:
        return clauses + [""] * extra, [1.0] * len(clauses) + [0.0] * extra, (
            [True] * len(clauses) + [False] * extra)
    indices = list(range(len(clauses))) + [int(i) for i in rng.integers(0, len(clauses), extra)]
    weights = [1.0 / indices.count(i) for i in indices]
    return [clauses[i] for i in indices], weights, [True] * count


def clean_label(label: str) -> str:
    """A class label as the prompts use it: underscores become spaces."""
    return label.replace("_", " ")


def vggsound_index_label(label: str) -> str:
    """A VGGSound label as the reference's index files store it: ", " becomes " "."""
    return label.replace(", ", " ")


def source_prompt(label: str) -> str:
    """The single-source prompt, "The sound of {label}" (clause prompts and test queries)."""
    return f"The sound of {clean_label(label)}"


def mixture_prompt(labels: Sequence[str]) -> str:
    """The mixture prompt, "The sound mixture of {l1} and {l2}" (labels joined with " and ")."""
    return "The sound mixture of " + " and ".join(clean_label(label) for label in labels)
