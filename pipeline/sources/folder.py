"""Image folders: every file below a folder is one record; labels from `labels.txt` (or --labels).

The folder is listed once on the driver (a labels file of ImageNet's 50K validation images is small)
and read by many ReadTasks, each reading its share of the files' bytes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from pathlib import Path
from typing import Iterator, Optional

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.sources import (NO_LABEL, RECORDS_PER_BLOCK, Source, SourceError, is_directory, read_datasource,
                              read_task_split, source_table)
from pipeline.sources.labels import LABELS_FILE, read_labels_file


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


def read_folder_records(root: str | Path, records: list[tuple[str, int]]):
    """A source-row block with the bytes of RECORDS' files; unreadable files become error rows."""
    root = Path(root)
    reads = [read_file(root, key) for key, _ in records]
    return source_table([key for key, _ in records], [label for _, label in records],
                        [data for data, _ in reads], [error for _, error in reads])


class ImageFolderDatasource(Datasource):
    """Reads an image folder's files in `read_task_split` ReadTasks, one block each."""

    def __init__(self, root: str | Path, labels: Optional[str | Path] = None, limit: Optional[int] = None):
        self.records = folder_records_to_read(root, labels)[:limit]
        self.root = Path(root).resolve()
        self.per_task, self.tasks = read_task_split(len(self.records))

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        from pipeline.sources.units import chunked

        root = self.root

        def make_task(chunk: list[tuple[str, int]]) -> ReadTask:
            def read() -> Iterator:
                yield read_folder_records(root, chunk)

            metadata = BlockMetadata(num_rows=len(chunk), size_bytes=None, exec_stats=None,
                                     input_files=None)
            return ReadTask(read, metadata)

        return [make_task(chunk) for chunk in chunked(self.records, self.per_task)]


def read_image_folder(root: str, labels: Optional[str] = None, limit: Optional[int] = None) -> Source:
    """Source rows, one per file in ROOT."""
    datasource = ImageFolderDatasource(root, labels, limit)
    # one block per ReadTask: Ray would otherwise split each small block to reach its default
    # parallelism, and a split read is not fused with the preprocessing
    return Source(read_datasource(datasource, datasource.tasks),
                  len(datasource.records), exact_count=True)


# Labelling: the driver walks the folder once and deals its units round-robin to UNIT_READ_TASKS
# ReadTasks, each given its units' file names. Tasks that walked the folder themselves would each
# see it as it was at their own walk: a file added in between shifted the units, and some files were
# labelled twice, others never.
UNIT_READ_TASKS = 4


def walk_files(root: str | Path) -> Iterator[str]:
    """Every file below ROOT as a relative POSIX path, names sorted at each level (the same order on
    every run); hidden entries, symlinked directories and ROOT's labels.txt are skipped, as by
    `list_folder_records`."""
    root = Path(root)

    def walk(directory: str, prefix: str) -> Iterator[str]:
        with os.scandir(directory) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if is_directory(entry):
                if not entry.is_symlink():
                    yield from walk(entry.path, f"{prefix}{entry.name}/")
            elif prefix or entry.name != LABELS_FILE:
                yield prefix + entry.name

    return walk(str(root), "")


def folder_units(root: Path, unit_size: int) -> Iterator[tuple[str, list[str]]]:
    """(id, keys) of every work unit of image folder ROOT: unit N is files [N*unit_size, (N+1)*unit_size)
    of the walk. The id also carries a hash of those files' names, so that a unit an earlier run
    finished is taken as done only while it still holds the same files (`check_finished_units`)."""
    from pipeline.sources.units import chunked

    for number, keys in enumerate(chunked(walk_files(root), unit_size)):
        # NUL cannot occur in a file name; surrogateescape keeps names that are not UTF-8 apart
        digest = hashlib.sha1("\0".join(keys).encode("utf-8", "surrogateescape")).hexdigest()[:12]
        yield f"files-{number:08d}-{digest}", keys


def check_finished_units(root: Path, units: list[tuple[str, list[str]]], done: set[str]) -> None:
    """Refuse (SourceError) to resume over ROOT, whose units are now UNITS, when a unit in DONE no
    longer holds the same files. Units are runs of the walk, so one file added, removed or renamed
    before the end of the finished units shifts them: the resume would label some files twice and
    never label others."""
    missing = done - {unit for unit, _ in units}
    if missing:
        raise SourceError(
            f"{root}: the folder changed since the interrupted run into this output: {len(missing)} of its "
            f"{len(done)} finished units no longer hold the same files (files were added, removed or renamed), "
            "so resuming would label some files twice and skip others; restore the folder as it was, or pass "
            "--overwrite to label it all again")


def folder_unit_readers(root: str | Path, done: set[str], unit_size: int,
                        tasks: int = UNIT_READ_TASKS) -> tuple[list, int]:
    """Readers for `pipeline.sources.units`, one per ReadTask, each reading every TASKS-th unit of
    `folder_units` not in DONE, and how many files those units hold. The folder is walked here, once:
    every reader reads the file names it was given, whatever the folder holds by then."""
    from pipeline.sources.units import chunked

    root = folder_root(root).resolve()
    units = list(folder_units(root, unit_size))
    check_finished_units(root, units, done)
    todo = [(unit, keys) for unit, keys in units if unit not in done]

    def reader_for(share: list[tuple[str, list[str]]]):
        def read_units():
            for unit, keys in share:
                yield unit, (read_folder_records(root, [(key, NO_LABEL) for key in block])
                             for block in chunked(keys, RECORDS_PER_BLOCK))

        return read_units

    return [reader_for(todo[task::tasks]) for task in range(tasks)], sum(len(keys) for _, keys in todo)
