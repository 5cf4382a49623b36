"""Input sources. Each input format is one module that turns a path into a Ray Dataset of
source rows; `read_source` picks the module by `--format` or by looking at the path.

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
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa

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
    import ray

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


def read_datasource(datasource, blocks: int):
    """The Ray Dataset of DATASOURCE's rows, read in BLOCKS tasks, each read timed (`TimedReads`)."""
    import ray.data

    from pipeline.sources.timed import TimedReads

    return ray.data.read_datasource(TimedReads(datasource), override_num_blocks=blocks)


def _read_parquet(path: str, labels: Optional[str], limit: Optional[int]):
    from pipeline.sources.parquet import read_parquet_shards

    return read_parquet_shards(path, labels=labels, limit=limit)


def _read_folder(path: str, labels: Optional[str], limit: Optional[int]):
    from pipeline.sources.folder import read_image_folder

    return read_image_folder(path, labels=labels, limit=limit)


def _read_tar(path: str, labels: Optional[str], limit: Optional[int]):
    from pipeline.sources.tar import read_tar_shards

    return read_tar_shards(path, labels=labels, limit=limit)


def _read_lmdb(path: str, labels: Optional[str], limit: Optional[int]):
    from pipeline.sources.lmdb import read_lmdb

    return read_lmdb(path, labels=labels, limit=limit)


# format name -> reader(path, labels, limit) -> Source
FORMATS: dict[str, Callable] = {
    "parquet": _read_parquet,
    "folder": _read_folder,
    "tar": _read_tar,
    "lmdb": _read_lmdb,
}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# what makes a file in a folder tree an image, for telling an image folder from a folder of tar shards
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm")
LMDB_DATA_FILE = "data.mdb"  # what makes a folder an LMDB database
ACCEPTED_INPUTS = ("a folder of images, a .parquet file, a .tar/.tar.gz/.tgz shard, a folder or glob of "
                   f"those, or an LMDB folder (holding {LMDB_DATA_FILE})")


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


def detect_format(path: str) -> str:
    """The input format of PATH: a folder or glob of .parquet files or of .tar shards (a folder tree
    of shards at any depth), an LMDB database (a folder holding data.mdb), or an image folder."""
    if is_glob(path):
        matches = glob.glob(path)
        if matches and all(m.endswith(".parquet") for m in matches):
            return "parquet"
        if matches and all(is_tar_name(m) for m in matches):
            return "tar"
        raise SourceError(f"{path}: the pattern matches no .parquet files or .tar shards")
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file or directory")
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        if is_tar_name(p.name):
            return "tar"
        # --format cannot help here: no format reads a lone image or an unknown file
        raise SourceError(f"{path}: not an input the pipeline reads: --data takes {ACCEPTED_INPUTS}; "
                          "put a single image in a folder")
    if (p / LMDB_DATA_FILE).is_file():
        return "lmdb"
    with os.scandir(p) as entries:
        names = [e.name for e in entries if not is_directory(e) and not e.name.startswith(".")]
    if names and all(n.endswith(".parquet") for n in names):
        return "parquet"
    return folder_tree_format(path)


def folder_tree_format(path: str) -> str:
    """"tar" for a folder tree holding .tar shards and no image files, "folder" otherwise; a
    SourceError when it holds both. Other files (a README) decide nothing: either reader makes each
    of them an error row."""
    from pipeline.sources.folder import walk_files  # the walk of the image folder reader itself

    shard = image = None
    for key in walk_files(path):
        if is_tar_name(key):
            shard = shard or key
        elif is_image_name(key):
            image = image or key
        if shard and image:  # the answer is known: no need to walk the rest of a large tree
            raise SourceError(f"{path}: holds both image files ({image}) and .tar shards ({shard}); "
                              "pass --format folder or --format tar")
    return "tar" if shard else "folder"


def check_source(path: str, fmt: Optional[str] = None, labels: Optional[str] = None) -> str:
    """The input format of PATH (FMT, or detected), once the checks that need neither Ray nor the
    records have passed: PATH exists, the format is known, the labels file parses. Cheap, so that a
    bad input is reported before Ray takes seconds to start; SourceError otherwise."""
    from pipeline.sources.labels import read_labels_file

    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise SourceError(f"unknown input format {fmt!r}: known formats are {', '.join(sorted(FORMATS))}")
    if not (is_glob(path) or os.path.exists(path)):
        raise SourceError(f"{path}: no such file or directory")
    labels_file = labels
    if fmt == "folder":  # an image folder's own labels.txt is read too
        from pipeline.sources.folder import folder_labels_file, folder_root

        labels_file = folder_labels_file(folder_root(path), labels)
    if labels_file:
        read_labels_file(labels_file)
    return fmt


def read_source(path: str, fmt: Optional[str] = None, labels: Optional[str] = None,
                limit: Optional[int] = None) -> Source:
    """Source rows from PATH in format FMT (detected when None)."""
    fmt = check_source(path, fmt, labels)
    return FORMATS[fmt](path, labels, limit)
