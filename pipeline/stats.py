"""The statistics the reports give, as plain numpy on per-image arrays: confidence intervals,
calibration error, McNemar's exact test, KL divergence and top-5 overlap."""

from __future__ import annotations

import math

import numpy as np

# two-sided 95%: the normal quantile Wilson's interval is built on
Z_95 = 1.959963984540054
ECE_BINS = 15


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion. Unlike the normal approximation (p +- z*se) it stays
    inside [0, 1] and keeps its coverage for accuracies near 100% and for small subsets."""
    if trials == 0:
        return 0.0, 0.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins over [0, 1] (a confidence of exactly 1 in the last): images,
    mean confidence and accuracy of each non-empty bin."""
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "images": int(members.sum()),
                         "confidence": float(confidence[members].mean()),
                         "accuracy": float(correct[members].mean())})
    return rows


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE: the image-weighted mean gap between accuracy and confidence over the bins."""
    total = sum(b["images"] for b in bins)
    return sum(b["images"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total if total else 0.0


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: under "both models are equally accurate" each of the n flips
    goes either way with probability 1/2, so the smaller count is Binomial(n, 1/2)."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    smaller = min(right_to_wrong, wrong_to_right)
    # in logs: n may be tens of thousands of flips on the full validation set
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(smaller + 1)]
    peak = max(log_terms)
    tail = math.exp(peak) * sum(math.exp(t - peak) for t in log_terms)
    return min(1.0, 2 * tail)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per row, in nats: how much information OTHER's class distribution
    loses against REFERENCE's (0 when identical)."""
    tiny = np.finfo(np.float32).tiny
    return np.sum(reference * (np.log(np.maximum(reference, tiny)) - np.log(np.maximum(other, tiny))), axis=1)


def top5_overlap(ids: np.ndarray, other_ids: np.ndarray) -> np.ndarray:
    """Per row, the share of the top-5 classes two models have in common (0 to 1)."""
    return (ids[:, :5, None] == other_ids[:, None, :5]).any(axis=2).sum(axis=1) / 5.0
