"""Image folders: every file below a folder is one record; labels from `labels.txt` (or --labels).

The folder is listed once on the driver (a labels file of ImageNet's 50K validation images is small)
and cut into pieces of consecutive files, each read by a ReadTask given the pieces' file names.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from pathlib import Path
from typing import Optional

import pyarrow as pa

from pipeline.sources.base import (LABELS_FILE, NO_LABEL, RECORDS_PER_BLOCK, Cut, Piece, Plan, SourceError, chunked,
                                   source_table, walk_files)
from pipeline.sources.labels import read_labels_file


def list_folder_records(root: str | Path, labels: Optional[str | Path] = None) -> list[tuple[str, int]]:
    """(key, label) for every file below ROOT (as `walk_files` finds them) and every file the labels
    name, sorted by key.

    A file without a label gets NO_LABEL; a labelled file that is absent is still a record (its read
    fails with a clear reason), so nothing the user listed disappears silently.
    """
    root = folder_root(root)
    labels_path = folder_labels_file(root, labels)
    label_of = read_labels_file(labels_path) if labels_path else {}
    keys = set(label_of) | set(walk_files(root))
    if labels_path and labels_path.resolve().is_relative_to(root.resolve()):
        keys.discard(labels_path.resolve().relative_to(root.resolve()).as_posix())
    return [(key, label_of.get(key, NO_LABEL)) for key in sorted(keys)]


def folder_records_to_read(root: str | Path, labels: Optional[str | Path] = None) -> list[tuple[str, int]]:
    """`list_folder_records`, refusing (SourceError) a folder that has none: every command that reads
    a folder whole says so the same way, where an empty result would look like a successful run."""
    records = list_folder_records(root, labels)
    if not records:
        raise SourceError(f"{root}: no files to read")
    return records


def folder_root(root: str | Path) -> Path:
    """ROOT as a Path, once it is known to be a folder."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory: --format folder reads a folder of images "
                          "(put a single image in a folder)")
    return root


def folder_labels_file(root: str | Path, labels: Optional[str | Path] = None) -> Optional[Path]:
    """The labels file of image folder ROOT: LABELS when given (it must exist), else the folder's
    own labels.txt when it has one (it is optional)."""
    if labels:
        return Path(labels)
    own = Path(root) / LABELS_FILE
    return own if own.is_file() else None


# The most bytes read for one record: Pillow refuses images over 89M pixels, which even as
# uncompressed RGB are under 270 MB. A bigger file (or one that never ends) is an error row, not a
# worker filled until the OOM killer ends it.
MAX_RECORD_BYTES = 512 << 20

FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def read_file(root: Path, key: str, max_bytes: int = MAX_RECORD_BYTES) -> tuple[bytes, str]:
    """The bytes of file KEY below ROOT and "", or b"" and why it cannot be read. Only a regular
    file (a symlink is followed) of at most MAX_BYTES is read: a FIFO would block the read for
    ever, /dev/zero never end. A key that leads out of ROOT (a labels file's `../x.jpg` or `/x.jpg`)
    is not read at all."""
    if posixpath.isabs(key) or key.split("/", 1)[0] == "..":  # keys are normalised (posixpath.normpath)
        return b"", "the key names a file outside the folder"
    try:
        # non-blocking: opening a FIFO would otherwise wait for a writer; its type is then refused
        handle = os.open(root / key, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return b"", "file not found"
    except OSError as exc:
        return b"", f"cannot read file: {exc.strerror or exc}"
    with open(handle, "rb") as f:
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode):
                kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
                return b"", f"not a regular file: {kind}"
            # one byte over the limit is read at most: a file still growing is stopped there too
            data = b"" if info.st_size > max_bytes else f.read(max_bytes + 1)
        except OSError as exc:
            return b"", f"cannot read file: {exc.strerror or exc}"
    if info.st_size > max_bytes or len(data) > max_bytes:
        return b"", f"file larger than the {max_bytes}-byte limit of one record"
    return data, ""


def read_folder_records(root: str | Path, records: list[tuple[str, int]]) -> pa.Table:
    """A source-row block with the bytes of RECORDS' files; unreadable files become error rows."""
    root = Path(root)
    reads = [read_file(root, key) for key, _ in records]
    return source_table([key for key, _ in records], [label for _, label in records],
                        [data for data, _ in reads], [error for _, error in reads])


# Labelling: the driver walks the folder once and deals its units round-robin to UNIT_READ_TASKS
# ReadTasks, each given its units' file names. Tasks that walked the folder themselves would each
# see it as it was at their own walk: a file added in between shifted the units, and some files were
# labelled twice, others never.
UNIT_READ_TASKS = 4


def piece_id(number: int, keys: list[str]) -> str:
    """The id of piece NUMBER of the walk, holding the files KEYS: it carries a hash of their names, so
    that a unit an earlier run finished is taken as done only while it still holds the same files
    (`check_finished_units`)."""
    # NUL cannot occur in a file name; surrogateescape keeps names that are not UTF-8 apart
    digest = hashlib.sha1("\0".join(keys).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"files-{number:08d}-{digest}"


def check_finished_units(root: Path, pieces: list[Piece], done: frozenset[str]) -> None:
    """Refuse (SourceError) to resume over ROOT, whose units are now PIECES, when a unit in DONE no
    longer holds the same files. Units are runs of the walk, so one file added, removed or renamed
    before the end of the finished units shifts them: the resume would label some files twice and
    never label others."""
    missing = done - {piece.id for piece in pieces}
    if missing:
        raise SourceError(
            f"{root}: the folder changed since the interrupted run into this output: {len(missing)} of its "
            f"{len(done)} finished units no longer hold the same files (files were added, removed or renamed), "
            "so resuming would label some files twice and skip others; restore the folder as it was, or pass "
            "--overwrite to label it all again")


def folder_piece(root: Path, number: int, records: list[tuple[str, int]]) -> Piece:
    """Piece NUMBER of the folder's listing: RECORDS (key, label), read in blocks of RECORDS_PER_BLOCK."""
    def read():
        return (read_folder_records(root, block) for block in chunked(records, RECORDS_PER_BLOCK))

    return Piece(piece_id(number, [key for key, _ in records]), len(records), read)


def plan_folder(path: str, labels: Optional[str], cut: Cut) -> Plan:
    """The pieces of image folder PATH: runs of consecutive files of the listing, `Cut.piece_rows` each.

    `evaluate` reads the files the folder holds and those its labels file names (`folder_records_to_read`),
    up to the limit, a ReadTask per piece. `pipeline label` reads the files of the walk, labels none, and
    deals the units not done round-robin to UNIT_READ_TASKS ReadTasks."""
    if not cut.units:
        records = folder_records_to_read(path, labels)[:cut.limit]
        root = Path(path).resolve()
    else:
        root = folder_root(path).resolve()
        records = [(key, NO_LABEL) for key in walk_files(root)]
    pieces = [folder_piece(root, number, chunk)
              for number, chunk in enumerate(chunked(records, cut.piece_rows(len(records))))]
    if not cut.units:
        return Plan("ImageFolder", pieces, len(records), exact_count=True)
    check_finished_units(root, pieces, cut.done)
    todo = [piece for piece in pieces if piece.id not in cut.done]
    return Plan("ImageFolder", todo, sum(piece.rows for piece in todo), read_tasks=UNIT_READ_TASKS)
