"""The 1,000 ILSVRC2012 classes in index order, shipped with the package (data/synset_words.txt:
`SYNSET name, other name, ...` a line)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

NUM_CLASSES = 1000


@dataclass(frozen=True)
class ClassList:
    """Synset ids, short names ("tench") and full names ("tench, Tinca tinca"), indexed by class id."""

    synsets: tuple[str, ...]
    names: tuple[str, ...]
    full_names: tuple[str, ...]


@lru_cache(maxsize=1)
def imagenet_classes() -> ClassList:
    text = resources.files("pipeline").joinpath("data/synset_words.txt").read_text(encoding="utf-8")
    synsets, names, full_names = [], [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        synset, _, full = line.strip().partition(" ")
        synsets.append(synset)
        full_names.append(full)
        names.append(full.split(",")[0].strip())
    if len(synsets) != NUM_CLASSES:
        raise RuntimeError(f"the packaged class list has {len(synsets)} classes, expected {NUM_CLASSES}")
    return ClassList(tuple(synsets), tuple(names), tuple(full_names))
