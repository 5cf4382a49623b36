"""What a run's predictions say beyond top-1/top-5, computed after the run from predictions.parquet:
confidence intervals, calibration, the most confused classes, ImageNet-ReaL top-1, and a model's
differences from a baseline on the same images."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.classes import imagenet_classes
from pipeline.real_labels import RealLabels
from pipeline.stats import (ECE_BINS, expected_calibration_error, kl_divergence, mcnemar_exact_p, reliability_bins,
                            top5_overlap, wilson_interval)

CONFUSED_PAIRS = 20
CHANGED_CLASSES = 10
FLIPPED_IMAGES = 6  # per direction


@dataclass(frozen=True)
class Predictions:
    """The evaluated images of one run (error rows left out), in key order."""

    keys: np.ndarray
    labels: np.ndarray
    top5_ids: np.ndarray
    top5_probs: np.ndarray
    probs: Optional[np.ndarray]  # [N, 1000] when the run kept the whole distributions

    @classmethod
    def read(cls, path: str | Path) -> Predictions:
        table = pq.read_table(path)
        table = table.filter(pc.equal(table["error"], "")).sort_by("key")
        n = table.num_rows

        def matrix(column: str) -> np.ndarray:  # fixed-size lists: their width even with no rows
            return table[column].combine_chunks().flatten().to_numpy().reshape(n, table[column].type.list_size)

        return cls(np.array(table["key"].to_pylist(), dtype=object), table["label"].to_numpy(),
                   matrix("top5_ids"), matrix("top5_probs"),
                   matrix("probs") if "probs" in table.column_names else None)

    @property
    def top1(self) -> np.ndarray:
        return self.top5_ids[:, 0]

    @property
    def correct(self) -> np.ndarray:
        return self.top1 == self.labels

    def subset(self, rows: np.ndarray) -> Predictions:
        return Predictions(self.keys[rows], self.labels[rows], self.top5_ids[rows], self.top5_probs[rows],
                           None if self.probs is None else self.probs[rows])


def interval(successes: int, trials: int) -> dict:
    low, high = wilson_interval(successes, trials)
    return {"low": low, "high": high}


def class_name(index: int) -> str:
    return imagenet_classes().names[index]


def model_quality(predictions: Predictions, real: Optional[RealLabels]) -> dict:
    """Top-1/top-5 95% Wilson intervals, ECE and its reliability bins, the most confused class pairs
    and (given REAL) ImageNet-ReaL top-1."""
    n = len(predictions.labels)
    correct = predictions.correct
    top5_correct = (predictions.top5_ids == predictions.labels[:, None]).any(axis=1)
    bins = reliability_bins(predictions.top5_probs[:, 0].astype(np.float64), correct, ECE_BINS)
    wrong = ~correct
    pairs = Counter(zip(predictions.labels[wrong].tolist(), predictions.top1[wrong].tolist()))
    quality = {
        "confidence_interval": "Wilson score interval, 95%",
        "top1_ci": interval(int(correct.sum()), n),
        "top5_ci": interval(int(top5_correct.sum()), n),
        "ece": expected_calibration_error(bins),
        "ece_bins": ECE_BINS,
        "reliability": bins,
        "confused_pairs": [
            {"label": true, "label_name": class_name(true), "predicted": predicted,
             "predicted_name": class_name(predicted), "images": count}
            # most images first, then class ids: the same order every run
            for (true, predicted), count in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:CONFUSED_PAIRS]
        ],
    }
    if real is not None:
        quality.update(real.score(predictions.keys.tolist(), predictions.top1))
    return quality


def class_accuracy(predictions: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Images and top-1 hits per class."""
    images = np.bincount(predictions.labels, minlength=len(imagenet_classes().names))
    hits = np.bincount(predictions.labels[predictions.correct], minlength=len(images))
    return images, hits


def flipped_images(rows: np.ndarray, confidence: np.ndarray, base: Predictions, other: Predictions) -> list[dict]:
    """The FLIPPED_IMAGES of ROWS where the compared model was most confident, most confident first."""
    chosen = rows[np.argsort(-confidence[rows], kind="stable")[:FLIPPED_IMAGES]]
    return [{"key": str(base.keys[i]), "label": int(base.labels[i]), "label_name": class_name(int(base.labels[i])),
             "baseline": int(base.top1[i]), "baseline_name": class_name(int(base.top1[i])),
             "baseline_confidence": float(base.top5_probs[i, 0]),
             "model": int(other.top1[i]), "model_name": class_name(int(other.top1[i])),
             "model_confidence": float(other.top5_probs[i, 0])} for i in chosen]


def against_baseline(base: Predictions, other: Predictions) -> dict:
    """OTHER against BASE on the images both evaluated: top-1 agreement, the flips and McNemar's exact
    p on them, mean KL(base || other) when both kept their distributions, mean top-5 overlap, the
    classes whose top-1 changed most and the most confident flipped images."""
    shared, base_rows, other_rows = np.intersect1d(base.keys.astype(str), other.keys.astype(str),
                                                   assume_unique=True, return_indices=True)
    base, other = base.subset(base_rows), other.subset(other_rows)
    right_to_wrong = np.flatnonzero(base.correct & ~other.correct)
    wrong_to_right = np.flatnonzero(~base.correct & other.correct)
    base_images, base_hits = class_accuracy(base)
    _, other_hits = class_accuracy(other)
    present = np.flatnonzero(base_images)
    change = (other_hits[present] - base_hits[present]) / base_images[present]
    order = np.lexsort((present, -np.abs(change)))[:CHANGED_CLASSES]
    confidence = other.top5_probs[:, 0]
    return {
        "images": len(shared),
        "top1_agreement": float(np.mean(base.top1 == other.top1)) if len(shared) else 0.0,
        "right_to_wrong": len(right_to_wrong),
        "wrong_to_right": len(wrong_to_right),
        "mcnemar_p": mcnemar_exact_p(len(right_to_wrong), len(wrong_to_right)),
        "mean_kl_from_baseline": float(np.mean(kl_divergence(base.probs.astype(np.float64),
                                                             other.probs.astype(np.float64))))
        if base.probs is not None and other.probs is not None and len(shared) else None,
        "mean_top5_overlap": float(np.mean(top5_overlap(base.top5_ids, other.top5_ids))) if len(shared) else 0.0,
        "changed_classes": [
            {"class": int(present[i]), "name": class_name(int(present[i])), "images": int(base_images[present[i]]),
             "baseline_top1": float(base_hits[present[i]] / base_images[present[i]]),
             "model_top1": float(other_hits[present[i]] / base_images[present[i]])}
            for i in order if change[i] != 0],
        "flipped_right_to_wrong": flipped_images(right_to_wrong, confidence, base, other),
        "flipped_wrong_to_right": flipped_images(wrong_to_right, confidence, base, other),
    }
