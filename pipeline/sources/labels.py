"""Labels files: `FILE CLASS_INDEX` a line (ImageNet's validation ground truth layout)."""

from __future__ import annotations

import posixpath
from pathlib import Path

from pipeline.sources import SourceError

LABELS_FILE = "labels.txt"


def read_labels_file(path: str | Path) -> dict[str, int]:
    """FILE -> class index. A missing file, or a line that is not `FILE INTEGER`, is a SourceError.

    FILE is normalised (`./a.jpg` as `find .` writes it is `a.jpg`; `a//b.jpg` and `a/./b.jpg` are
    `a/b.jpg`), as the sources' keys are: a label is found by its record's key."""
    if not Path(path).is_file():
        raise SourceError(f"{path}: labels file not found")
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise SourceError(f"{path}:{number}: expected 'FILE CLASS_INDEX', got {line.strip()!r}")
            key = posixpath.normpath(fields[0])
            if key in labels:
                raise SourceError(f"{path}:{number}: {key} is listed twice"
                                  + (f" (here as {fields[0]})" if key != fields[0] else ""))
            labels[key] = int(fields[1])
    return labels
