"""Streaming accuracy: counts updated batch by batch, never the whole output held at once."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.classes import NUM_CLASSES

ERROR_SAMPLES = 20


class AccuracyCounter:
    """Top-1/top-5 counts, per class, per node, and errors, from prediction batches."""

    def __init__(self) -> None:
        self.records = 0
        self.top1 = 0
        self.top5 = 0
        self.class_images = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.class_top1 = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.class_top5 = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.errors = 0
        self.error_samples: list[dict] = []
        self.node_images: Counter = Counter()
        self.cores: set[tuple[str, int]] = set()
        # keys seen, to count records that repeat one (Parquet shards or tar members of one name):
        # each is scored, and the count says so
        self.keys: set[str] = set()
        self.duplicate_keys = 0

    @property
    def evaluated(self) -> int:
        return self.records - self.errors

    def update(self, batch: dict[str, np.ndarray]) -> None:
        ok = batch["error"] == ""
        self.records += len(ok)
        for key in batch["key"].tolist():
            self.duplicate_keys += key in self.keys
            self.keys.add(key)
        self.errors += int((~ok).sum())
        for key, reason in zip(batch["key"][~ok], batch["error"][~ok]):
            if len(self.error_samples) < ERROR_SAMPLES:
                self.error_samples.append({"key": str(key), "reason": str(reason)})
        labels = batch["label"][ok]
        ids = batch["top_ids"][ok]
        hit1 = ids[:, 0] == labels
        hit5 = (ids[:, :5] == labels[:, None]).any(axis=1)
        self.top1 += int(hit1.sum())
        self.top5 += int(hit5.sum())
        np.add.at(self.class_images, labels, 1)
        np.add.at(self.class_top1, labels, hit1)
        np.add.at(self.class_top5, labels, hit5)
        if "node" in batch:
            self.node_images.update(Counter(batch["node"][ok].tolist()))
            self.cores.update(zip(batch["node"][ok].tolist(), batch["core"][ok].tolist()))

    def summary(self) -> dict:
        evaluated = self.evaluated
        return {
            "images": self.records,
            "evaluated": evaluated,
            "errors": self.errors,
            "duplicate_keys": self.duplicate_keys,
            "top1": self.top1 / evaluated if evaluated else 0.0,
            "top5": self.top5 / evaluated if evaluated else 0.0,
            "top1_correct": self.top1,
            "top5_correct": self.top5,
            "per_class": {
                str(c): {
                    "images": int(self.class_images[c]),
                    "top1": float(self.class_top1[c] / self.class_images[c]),
                    "top5": float(self.class_top5[c] / self.class_images[c]),
                }
                for c in np.flatnonzero(self.class_images)
            },
            "error_samples": self.error_samples,
        }
