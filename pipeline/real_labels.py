"""ImageNet-ReaL (Beyer et al. 2020): the reassessed sets of correct classes of the 50,000
ILSVRC2012 validation images, shipped as data/real.json (Apache-2.0, see data/real.json.NOTICE).

A prediction is ReaL-correct when its top-1 class is in the image's set; images whose set is empty
(no label fits) are left out, as the paper does. ReaL applies when the records are named as the
validation files are (`ILSVRC2012_val_00000001.JPEG`, in any folder or archive path)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.classes import NUM_CLASSES
from pipeline.config import ConfigError

VALIDATION_NAME = re.compile(r"(?:^|/)ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
PACKAGED = "the packaged ReaL labels"


@dataclass(frozen=True)
class RealLabels:
    """Entry i: the correct classes of validation image i + 1."""

    sets: tuple[frozenset[int], ...]
    source: str

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> RealLabels:
        """The labels in PATH (a JSON list of lists of class indices), or the packaged ones; a file that
        is not that is one ConfigError sentence, before any work starts."""
        if path is None:
            text, source = resources.files("pipeline").joinpath("data/real.json").read_text(), PACKAGED
        else:
            source = str(path)
            try:
                text = Path(path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--real-labels {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
                    from None
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--real-labels {source}: not JSON ({exc})") from None
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and all(isinstance(c, int) and 0 <= c < NUM_CLASSES for c in e) for e in entries):
            raise ConfigError(f"--real-labels {source}: expected a JSON list of lists of class indices "
                              f"0..{NUM_CLASSES - 1}, one list per validation image")
        return cls(tuple(frozenset(e) for e in entries), source)

    def score(self, keys: list[str], top1: np.ndarray) -> dict:
        """ReaL top-1 of the predictions TOP1 of the records KEYS (evaluated images only):
        `real_top1` with its image counts, or `real_top1` None and `real_note` saying why not."""
        numbers = [VALIDATION_NAME.search(key) for key in keys]
        if not keys or not all(numbers):
            named = sum(1 for n in numbers if n)
            return {"real_top1": None,
                    "real_note": f"ReaL top-1 not computed: {len(keys) - named} of {len(keys)} keys are not "
                                 "ILSVRC2012 validation file names (ILSVRC2012_val_NNNNNNNN.JPEG)"}
        indices = np.array([int(n.group(1)) - 1 for n in numbers])
        outside = np.flatnonzero((indices < 0) | (indices >= len(self.sets)))
        if len(outside):
            return {"real_top1": None,
                    "real_note": f"ReaL top-1 not computed: {self.source} holds {len(self.sets)} images' labels and "
                                 f"does not cover {len(outside)} of the {len(keys)} keys (such as {keys[outside[0]]})"}
        labelled = [i for i, index in enumerate(indices) if self.sets[index]]
        correct = sum(int(top1[i]) in self.sets[indices[i]] for i in labelled)
        scored = {"real_top1_correct": correct, "real_images": len(labelled),
                  "real_left_out": len(keys) - len(labelled), "real_labels": self.source}
        if not labelled:
            return {"real_top1": None, **scored,
                    "real_note": f"ReaL top-1 not computed: no image of these {len(keys)} has a ReaL label"}
        return {"real_top1": correct / len(labelled), **scored}
