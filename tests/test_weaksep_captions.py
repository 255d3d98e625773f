"""The weakly supervised separator's caption splitter, clause choice and prompt templates."""

import numpy as np
import pytest

from clipsep_jax.families.weaksep import captions


@pytest.mark.parametrize(("caption", "clauses"), [
    ("A man speaks and a dog barks", ["A man speaks", "A dog barks"]),
    # Protected phrases stop the " and " split of the whole fragment, and only that split.
    ("A man and woman talk while a car passes", ["A man and woman talk", "A car passes"]),
    ("A siren wails on and off and a dog barks", ["A siren wails on and off and a dog barks"]),
    ("Church bells and a horn sound, then silence", ["Church bells and a horn sound", "Silence"]),
    ("Bells and a horn sound", ["Bells", "A horn sound"]),  # the match is case-sensitive
    # " and is followed by" goes first; capitalize() lower-cases the rest of the clause.
    ("Water runs and is followed by a Man speaking", ["Water runs", "A man speaking"]),
    ("A dog barks at a close distance", ["A dog barks"]),
    ("A man speaks, and a woman laughs", ["A man speaks", "A woman laughs"]),
    ("People cheer, And clap", ["People cheer", "Clap"]),
    # "then" is deleted inside words too.
    ("Engines strengthen then a horn honks", ["Engines streng", "A horn honks"]),
    ("Rain AND thunder", ["Rain and thunder"]),
    ("  rain FALLS. ", ["Rain falls."]),
    ("Wind blowing", ["Wind blowing"]),
    ("", []),
    (" and ", []),
    # No de-duplication.
    ("A dog barks, a dog barks and a dog barks", ["A dog barks"] * 3),
])
def test_split_caption(caption, clauses):
    assert captions.split_caption(caption) == clauses


def test_connectives_and_protected_phrases_are_the_references():
    assert len(captions.CONNECTIVES) == 21
    assert captions.CONNECTIVES.index(" and is followed by") == 0
    assert captions.CONNECTIVES[-1] == " which "
    assert [c for c in captions.CONNECTIVES if not c.endswith(" ")] == [
        " and is followed by", " after which", " at a close distance"]
    assert len(captions.PROTECTED_PHRASES) == 6


def test_choose_clauses():
    rng = np.random.default_rng(0)
    assert captions.choose_clauses(["a", "b", "c"], 3, rng) == (
        ["a", "b", "c"], [1.0] * 3, [True] * 3)
    for _ in range(10):
        prompts, weights, valid = captions.choose_clauses(list("abcde"), 3, rng)
        assert len(set(prompts)) == 3 and set(prompts) <= set("abcde")
        assert weights == [1.0] * 3 and valid == [True] * 3
    for _ in range(10):
        prompts, weights, valid = captions.choose_clauses(["a", "b"], 3, rng)
        assert prompts[:2] == ["a", "b"] and prompts[2] in ("a", "b")
        assert valid == [True] * 3
        for clause in ("a", "b"):  # every clause counts once in the weighted sum
            assert sum(w for p, w in zip(prompts, weights, strict=True) if p == clause) == 1.0
    assert captions.choose_clauses(["a"], 3, rng) == (["a"] * 3, [1 / 3] * 3, [True] * 3)
    assert captions.choose_clauses(["a"], 3, rng, pad_with_duplicates=False) == (
        ["a", "", ""], [1.0, 0.0, 0.0], [True, False, False])
    with pytest.raises(ValueError, match="no clauses"):
        captions.choose_clauses([], 3, rng)


def test_templates():
    assert captions.source_prompt("acoustic_guitar") == "The sound of acoustic guitar"
    assert captions.mixture_prompt(["acoustic_guitar", "violin"]) == (
        "The sound mixture of acoustic guitar and violin")
    assert captions.vggsound_index_label("dog barking, growling") == "dog barking growling"
