"""What every input format shares: the source-row contract, the split of an input into pieces, and
the path helpers the formats use.

Source rows (the contract every reader follows, one Arrow schema per dataset):

- ``key``    string: the record's identity (file name, path inside an archive, LMDB key).
- ``label``  int64: class index 0..999 in ILSVRC2012 order, ``NO_LABEL`` (-1) when the source has none.
- ``image``  binary: the encoded image (JPEG, PNG, ...) exactly as stored, or raw pixels when
             ``raw_height`` > 0.
- ``error``  string: "" for a good record; otherwise why the record could not be read. Such a row is
             carried to the output as an error row, never dropped.

Optional columns a reader may add (all or none, for every row):

- ``raw_height``, ``raw_width``, ``raw_channels`` int32: when > 0, ``image`` holds uint8 pixels in
  HWC order, RGB for 3 channels, greyscale for 1.
- ``bbox_ymin``, ``bbox_xmin``, ``bbox_height``, ``bbox_width`` int32: crop to this box before
  scaling (Caffe2 TensorProtos records); all 0 means no box.

Pieces: a format plans an input as pieces (`Plan`), each with a stable id, its row count when known
and a function that reads it as source-row blocks; `pipeline.sources.datasource` turns a plan into
Ray ReadTasks. `Cut` says how big the pieces are: a ReadTask's share of the cluster for `evaluate`,
or work units of `pipeline label` (`pipeline.sources.units`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pyarrow as pa
import ray

from pipeline.errors import UserError

NO_LABEL = -1
SOURCE_COLUMNS = ("key", "label", "image", "error")
RAW_COLUMNS = ("raw_height", "raw_width", "raw_channels")
BBOX_COLUMNS = ("bbox_ymin", "bbox_xmin", "bbox_height", "bbox_width")
SOURCE_SCHEMA = pa.schema(
    [("key", pa.string()), ("label", pa.int64()), ("image", pa.binary()), ("error", pa.string())]
)

# Records in one block of a large input: a block is read and preprocessed in one task and reaches
# an inference actor as one task of its own, so every block costs a fixed amount of scheduling, of
# object-store bookkeeping and of the driver's work. On a fast model (MobileNetV2 int8: 4 ms an image)
# blocks of 64 spent more CPU on that than on the model itself; 256 amortise it while a block's
# uint8 crops stay small (38 MB at 224x224). A small input gets smaller blocks, so that every CPU of
# the cluster still gets TASKS_PER_CPU of them.
RECORDS_PER_BLOCK = 256
TASKS_PER_CPU = 4
# A read of at most this many records is preprocessed inside its own task even when the reads are
# fewer than the cluster wants tasks (`recut_rows`); `pipeline prepare` writes Parquet row groups of
# this size, the smallest piece a shard can be read by, so that a small shard still spreads.
SMALL_READ_ROWS = 64

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# what makes a file in a folder tree an image, for telling an image folder from a folder of tar shards
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm")
LMDB_DATA_FILE = "data.mdb"  # what makes a folder an LMDB database
LABELS_FILE = "labels.txt"  # an image folder's own labels file, which is not one of its records


class SourceError(UserError):
    """An input that cannot be read at all (as opposed to one bad record); the message says why."""


def utf8_key(key: str) -> str:
    r"""KEY as valid UTF-8. Python keeps the bytes of a file or tar member name that is not UTF-8 as
    lone surrogates (`caf\udce9.jpg`), which Arrow cannot store: they are written as backslash
    escapes (`caf\xe9.jpg`), the same on every run."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_table(keys: list[str], labels: list[int], images: list[bytes], errors: list[str]) -> pa.Table:
    """A block of source rows in the contract's schema."""
    try:
        key_array = pa.array(keys, pa.string())
    except UnicodeEncodeError:  # a name that is not UTF-8 (rare: escaped only then)
        key_array = pa.array([utf8_key(key) for key in keys], pa.string())
    return pa.Table.from_arrays(
        [key_array, pa.array(labels, pa.int64()),
         pa.array(images, pa.binary()), pa.array(errors, pa.string())],
        schema=SOURCE_SCHEMA,
    )


def read_task_target() -> int:
    """How many ReadTasks keep every CPU of the cluster busy (TASKS_PER_CPU each)."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return TASKS_PER_CPU * max(cpus, 1)


def read_task_split(records: int) -> tuple[int, int]:
    """(records per ReadTask, ReadTasks) for an input of RECORDS records whose split is ours (image
    folders, LMDB, Parquet row groups, tar members): RECORDS_PER_BLOCK records a task, or fewer for a
    small input (see RECORDS_PER_BLOCK)."""
    per_task = max(1, min(RECORDS_PER_BLOCK, math.ceil(records / read_task_target())))
    return per_task, max(1, math.ceil(records / per_task))


def recut_rows(read_rows: list[Optional[int]], records: Optional[int]) -> Optional[int]:
    """`Source.recut_rows` for reads of READ_ROWS records each (None where unknown), RECORDS in all:
    a task's share (`read_task_split`) when the reads are too few to keep every CPU busy and some
    holds more than SMALL_READ_ROWS, None when they are preprocessed well enough inside the read tasks."""
    if len(read_rows) >= read_task_target() or all(rows is not None and rows <= SMALL_READ_ROWS
                                                    for rows in read_rows):
        return None
    return read_task_split(records)[0] if records else RECORDS_PER_BLOCK


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """ITEMS in lists of SIZE, the last one shorter when they do not divide evenly."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Source:
    """A Ray Dataset of source rows, and how many records it holds when that is known without reading.

    RECUT_ROWS is set when some of the dataset's read tasks hold more records than the cluster's split
    wants and cannot be cut finer before reading: a Parquet shard written as one row group (pyarrow's
    default up to a million rows), a compressed tar, fewer label units than the cluster has room for.
    Its rows are then preprocessed on blocks re-cut to RECUT_ROWS rows, in tasks of their own, rather
    than inside those few read tasks (`pipeline.runtime.map_after_read`).

    EXACT_COUNT says NUM_RECORDS is exactly how many rows the dataset must yield (an LMDB entry count,
    Parquet footers, a listed folder; not a tar's header scan, to which a damaged archive adds an error
    row): a run that receives another number lost or repeated records (`check_all_read`)."""

    dataset: Any  # ray.data.Dataset
    num_records: Optional[int] = None
    recut_rows: Optional[int] = None
    exact_count: bool = False

    def check_all_read(self, received: int, path: str) -> None:
        """Raise SourceError unless RECEIVED rows are the whole of an exactly counted source. LMDB
        range reads trust the B-tree's key order: damage that breaks it makes a range stop early or
        start late, and records are silently skipped or read twice."""
        if self.exact_count and self.num_records is not None and received != self.num_records:
            raise SourceError(f"{path}: {received} records were read, but it holds {self.num_records}: it is damaged "
                              "(for LMDB, its key order) or changed while it was read, so the results would not "
                              "be over exactly its records")


@dataclass(frozen=True)
class Cut:
    """How a format cuts an input into pieces.

    For `evaluate` (UNIT_ROWS None) a piece is a ReadTask's share (`read_task_split`), labels are read,
    and LIMIT caps the records read. For `pipeline label` a piece is a work unit of at most UNIT_ROWS
    records whose id is stable from run to run, the units in DONE (finished by an earlier run) are
    left out, and no labels are read."""

    unit_rows: Optional[int] = None
    done: frozenset[str] = frozenset()
    limit: Optional[int] = None

    @property
    def units(self) -> bool:
        return self.unit_rows is not None

    def piece_rows(self, records: int) -> int:
        """The most records of a piece, for an input of RECORDS records."""
        return self.unit_rows if self.unit_rows is not None else read_task_split(records)[0]


@dataclass(frozen=True)
class Piece:
    """A part of an input read by one ReadTask: ID stable on every run over the same input (for a
    format whose pieces are work units, the unit's id), ROWS the rows it reads as when known before
    reading, READ a zero-argument function yielding its source-row blocks, FILES the files it reads."""

    id: str
    rows: Optional[int]
    read: Callable[[], Iterable[pa.Table]]
    files: Optional[list[str]] = None


@dataclass
class Plan:
    """An input cut into PIECES, and what is known of it before reading.

    NAME names its read in Ray Data's progress (`Read<NAME>`). RECORDS is how many rows the pieces
    read as when known, EXACT_COUNT and RECUT_ROWS are `Source`'s. LIMIT, when set, is how many rows to
    keep of what the pieces read (a format that cuts its pieces to the limit leaves it None).
    READ_TASKS, when set, deals the pieces round-robin to that many ReadTasks, each reading its pieces
    in order; otherwise every piece is a ReadTask. SCHEMA and SIZE_BYTES, when known, are given to Ray
    Data."""

    name: str
    pieces: list[Piece]
    records: Optional[int] = None
    exact_count: bool = False
    recut_rows: Optional[int] = None
    limit: Optional[int] = None
    read_tasks: Optional[int] = None
    schema: Optional[pa.Schema] = None
    size_bytes: Optional[int] = None


def shard_unit_id(file: str) -> str:
    """The stable id of an input shard: its file name made file-name safe, and a hash of its absolute
    path that keeps ids unique and unchanged when shards are added to the input."""
    digest = hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(file))[:80]}-{digest}"


def names_below_common_folder(files: list[str]) -> list[str]:
    """Each of FILES as a POSIX path relative to the deepest folder holding them all (its file name,
    for the files of one folder): names that keep apart files of one name in different folders of a
    glob."""
    paths = [os.path.abspath(file) for file in files]
    base = os.path.commonpath([os.path.dirname(path) for path in paths])
    return [Path(os.path.relpath(path, base)).as_posix() for path in paths]


def is_directory(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a directory (or a symlink to one). A symlink loop is not: it is then
    taken for a file, which cannot be read and becomes an error row, instead of failing the walk."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def is_tar_name(name: str) -> bool:
    return name.endswith(TAR_SUFFIXES)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def walk_files(root: str | Path) -> Iterator[str]:
    """Every file below ROOT as a relative POSIX path, names sorted at each level (the same order on
    every run); hidden entries, symlinked directories and ROOT's labels.txt are skipped. Image folders
    and folders of tar shards are walked alike."""
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
