"""Labels files: `FILE CLASS_INDEX` a line (ImageNet's validation ground truth layout)."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from pipeline.sources.base import SourceError, utf8_key

# a class index: ASCII digits (not `²` or other Unicode digits) that fit the int64 label column
CLASS_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


def read_labels_file(path: str | Path) -> dict[str, int]:
    """FILE -> class index. A missing file, or a line that is not `FILE INTEGER`, is a SourceError.

    FILE is normalised (`./a.jpg` as `find .` writes it is `a.jpg`; `a//b.jpg` and `a/./b.jpg` are
    `a/b.jpg`), as the sources' keys are: a label is found by its record's key. The file is read as
    UTF-8, a byte-order mark skipped; bytes that are not UTF-8 are kept as Python keeps such bytes of
    file and tar member names, so that `find . > labels.txt` on a Latin-1 file system still matches."""
    if not Path(path).is_file():
        raise SourceError(f"{path}: labels file not found")
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            # FILE is all before the last field, as ImageNet's tools read it: a name may hold spaces
            fields = line.strip().rsplit(None, 1)
            if len(fields) != 2 or not CLASS_INDEX.fullmatch(fields[1]):
                raise SourceError(f"{path}:{number}: expected 'FILE CLASS_INDEX', got {utf8_key(line.strip())!r}")
            key = posixpath.normpath(fields[0])
            if key in labels:
                raise SourceError(f"{path}:{number}: {utf8_key(key)} is listed twice"
                                  + (f" (here as {utf8_key(fields[0])})" if key != fields[0] else ""))
            labels[key] = int(fields[1])
    return labels
