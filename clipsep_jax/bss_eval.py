"""SDR, SIR and SAR of separated sources, as the reference's evaluation computes them.

Two metric definitions, named after the libraries the reference can use (its ``--backend``):

- ``museval``: museval's BSSEval v4 with the window spanning the whole signal (the reference's
  default). For single-channel sources its SDR is the plain ratio |s|^2 / |s - s_hat|^2 (the
  image decomposition's terms add up to s_hat - s), and its SIR and SAR equal bss_eval_sources'.
- ``mir_eval``: mir_eval's ``bss_eval_sources`` (BSSEval v3): the target may pass a 512-tap
  distortion filter before the SDR is taken.

Each is computed either by that library itself (``fast=False``) or with fast_bss_eval's
closed-form solver (``fast=True``, several times faster); :func:`agreement` measures the gap.
This module imports numpy and the metric libraries only, so metric worker processes start quickly
and never initialise an accelerator.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.stats
from fast_bss_eval.numpy.metrics import square_cosine_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # mir_eval 0.8's deprecation notice
    import mir_eval.separation

__all__ = [
    "METRICS",
    "DEFINITIONS",
    "source_metrics",
    "agreement",
    "score_example",
    "ExampleScores",
    "summarise",
]

METRICS = ("sdr", "sir", "sar")
DEFINITIONS = ("museval", "mir_eval")
FILTER_LENGTH = 512  # BSSEval's distortion filter taps (both libraries' default)
SILENCE = 1e-5  # the reference skips signals whose summed |samples| is at most this


def _fast_coherences(references: np.ndarray, estimates: np.ndarray) -> tuple[np.ndarray, ...]:
    """fast_bss_eval's squared cosines (SDR and SAR) of each estimate with its own reference."""
    # pairwise=True: fast_bss_eval 0.1.4's one-to-one path calls np.linalg.solve with a stacked
    # right-hand side that numpy 2 reads as matrices; the pairwise path solves the same systems.
    coh_sdr, coh_sar = square_cosine_metrics(
        references.astype(np.float64), estimates.astype(np.float64),
        filter_length=FILTER_LENGTH, pairwise=True)
    return (np.diagonal(coh_sdr, axis1=-2, axis2=-1), np.diagonal(coh_sar, axis1=-2, axis2=-1))


def _ratio_db(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    tiny = np.finfo(np.float64).tiny
    return 10.0 * np.log10(np.maximum(numerator, tiny) / np.maximum(denominator, tiny))


def source_metrics(
    references: np.ndarray, estimates: np.ndarray, definition: str = "museval", fast: bool = True
) -> dict[str, np.ndarray]:
    """SDR, SIR, SAR in dB of estimate n against reference n (no permutation).

    Args:
      references: [N, samples] true sources.
      estimates: [N, samples] their estimates (same length).
      definition: ``museval`` or ``mir_eval`` (see the module docstring).
      fast: compute with fast_bss_eval instead of the named library.
    Returns:
      {"sdr", "sir", "sar"}: float64 [N] each.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"metric definition {definition!r}: expected one of {DEFINITIONS}")
    references = np.asarray(references, np.float64)
    estimates = np.asarray(estimates, np.float64)
    if references.shape != estimates.shape or references.ndim != 2:
        raise ValueError(
            f"references {references.shape} and estimates {estimates.shape} must both be "
            "[sources, samples]")
    if fast:
        try:
            coh_sdr, coh_sar = _fast_coherences(references, estimates)
        except np.linalg.LinAlgError:
            # Singular correlation matrices (a pure tone's delayed copies are linearly
            # dependent): the libraries fall back to least squares, so they take this one.
            return source_metrics(references, estimates, definition, fast=False)
        sir = _ratio_db(coh_sdr, coh_sar - coh_sdr)
        sar = _ratio_db(coh_sar, 1.0 - coh_sar)
        if definition == "mir_eval":
            sdr = _ratio_db(coh_sdr, 1.0 - coh_sdr)
        else:
            sdr = _ratio_db(np.sum(references**2, -1), np.sum((references - estimates) ** 2, -1))
        return {"sdr": sdr, "sir": sir, "sar": sar}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mir_eval 0.8's deprecation notice
        if definition == "museval":
            import museval.metrics  # 1 s to import; only the library check uses it

            sdr, _, sir, sar, _ = museval.metrics.bss_eval(references, estimates, np.inf)
            return {"sdr": sdr[:, 0], "sir": sir[:, 0], "sar": sar[:, 0]}
        sdr, sir, sar, _ = mir_eval.separation.bss_eval_sources(
            references, estimates, compute_permutation=False)
        return {"sdr": sdr, "sir": sir, "sar": sar}


def agreement(references: np.ndarray, estimates: np.ndarray, definition: str) -> float:
    """Largest |fast - library| over SDR, SIR and SAR of every source, in dB."""
    fast = source_metrics(references, estimates, definition, fast=True)
    slow = source_metrics(references, estimates, definition, fast=False)
    return float(max(np.max(np.abs(fast[m] - slow[m])) for m in METRICS))


@dataclasses.dataclass
class ExampleScores:
    """The metrics of one test mixture's queried source (index 0 of the references)."""

    index: int
    mixture: dict[str, float] | None  # the unprocessed mixture scored as the estimate
    candidates: list[dict[str, float] | None]  # per candidate mask; None: skipped as silent
    skipped: list[str]  # why each None candidate (or the mixture) was skipped
    agreement_db: float | None = None  # fast against library, when checked


def score_example(
    index: int,
    references: np.ndarray,
    candidates: np.ndarray,
    mixture: np.ndarray,
    definition: str,
    fast: bool,
    check: bool = False,
) -> ExampleScores:
    """Scores each candidate separation of one test mixture, as the reference does.

    Args:
      index: the test mixture's index (carried into the result).
      references: [2, samples] the queried source and the rest (the interference).
      candidates: [C, 2, samples] estimates of the two (a mask's output and its complement).
      mixture: [samples] the mixture, scored as the estimate of both: the baseline.
      definition, fast: see :func:`source_metrics`.
      check: also score the first candidate with the library and record the gap.
    Returns:
      the queried source's metrics per candidate (None where the reference would skip: a
      reference or an estimate with summed |samples| <= 1e-5).
    """
    skipped = []
    silent_reference = [i for i in range(len(references))
                        if np.abs(references[i]).sum() <= SILENCE]
    if silent_reference:
        reason = f"reference {silent_reference} is silent"
        return ExampleScores(index, None, [None] * len(candidates), [reason])
    both = np.stack([mixture, mixture])
    mixture_scores = {m: float(v[0]) for m, v in
                      source_metrics(references, both, definition, fast).items()}
    scored: list[dict[str, float] | None] = []
    for c, estimate in enumerate(candidates):
        if any(np.abs(e).sum() <= SILENCE for e in estimate):
            scored.append(None)
            skipped.append(f"candidate {c}: an estimate is silent")
            continue
        values = source_metrics(references, estimate, definition, fast)
        scored.append({m: float(v[0]) for m, v in values.items()})
    gap = None
    if check and scored and scored[0] is not None:
        gap = agreement(references, candidates[0], definition)
    return ExampleScores(index, mixture_scores, scored, skipped, gap)


def summarise(values: list[float] | np.ndarray) -> dict[str, float]:
    """count, mean, 95% confidence half-width (Student t on the standard error), sem, median."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return {"count": 0, "mean": float("nan"), "ci95": float("nan"), "sem": float("nan"),
                "median": float("nan")}
    sem = float(scipy.stats.sem(v)) if len(v) > 1 else float("nan")
    half = float(scipy.stats.t.ppf(0.975, len(v) - 1) * sem) if len(v) > 1 else float("nan")
    return {"count": int(len(v)), "mean": float(v.mean()), "ci95": half, "sem": sem,
            "median": float(np.median(v))}
