"""Labels files: `FILE CLASS_INDEX` a line (ImageNet's validation ground truth layout)."""

from __future__ import annotations

from pathlib import Path

from pipeline.sources import SourceError

LABELS_FILE = "labels.txt"


def read_labels_file(path: str | Path) -> dict[str, int]:
    """FILE -> class index. A missing file, or a line that is not `FILE INTEGER`, is a SourceError."""
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
            if fields[0] in labels:
                raise SourceError(f"{path}:{number}: {fields[0]} is listed twice")
            labels[fields[0]] = int(fields[1])
    return labels
