"""Tar archives of images, WebDataset-style: one or many `.tar` shards (a file, a folder of shards
searched recursively, or a glob), every regular member one record, read in stream order with no
index and no seeking, one ReadTask per shard.

Keys are member paths inside the shard (normalised: `./x.jpg` is `x.jpg`), prefixed with the shard's
path relative to the input folder when the input is a folder or glob of shards
(`shard-0001.tar/n01440764_tench.JPEG`). Nothing is dropped: a member that is not an image is passed
on as it is and fails decoding with the decoder's reason; a member that is not a regular file, a
member cut short, an archive corrupt part-way, a shard that is not a tar at all, and a file of the
folder or glob that is not named as a tar shard (a README) each become an error row.
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.sources import NO_LABEL, RECORDS_PER_BLOCK, Source, SourceError, is_glob, is_tar_name, source_table
from pipeline.sources.labels import read_labels_file

TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def tar_shards(path: str) -> list[tuple[str, str]]:
    """(file, key prefix) for every file PATH names, in a fixed order: a shard file, every file of a
    glob, or every file below a folder as the image folder reader walks it (hidden files and the
    top-level labels.txt left out). A file not named as a shard is listed too: it is an error row
    (see `is_misplaced`), never skipped silently."""
    from pipeline.sources.folder import walk_files

    if is_glob(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        base = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    elif Path(path).is_dir():
        files = [os.path.join(path, key) for key in walk_files(path)]
        base = path
    elif Path(path).is_file():
        return [(path, "")]
    else:
        raise SourceError(f"{path}: no such file or directory")
    if not any(is_tar_name(file) for file in files):
        raise SourceError(f"{path}: no .tar shards")
    return [(file, Path(os.path.relpath(file, base)).as_posix() + "/") for file in files]


def is_misplaced(file: str, prefix: str) -> bool:
    """Whether FILE, listed by `tar_shards` with PREFIX, is a file of a folder or glob of shards that is
    not named as a shard (a lone file the user named is read as a tar whatever its name)."""
    return bool(prefix) and not is_tar_name(file)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "link"
    return "device or special file" if member.isdev() or member.isfifo() else "non-regular entry"


def tar_records(file: str, prefix: str) -> Iterator[tuple[str, bytes, str]]:
    """(key, bytes, error) for every member of the shard, in stream order."""
    shard_key = prefix.rstrip("/") or Path(file).name
    if is_misplaced(file, prefix):
        yield shard_key, b"", "not a tar shard (its name does not end in .tar, .tar.gz or .tgz)"
        return
    members = 0
    try:
        archive = tarfile.open(file, mode="r|*")
    except TAR_ERRORS as exc:
        yield shard_key, b"", f"not a readable tar archive: {exc}"
        return
    with archive:
        try:
            for member in archive:
                if member.isdir():
                    continue
                members += 1
                key = prefix + posixpath.normpath(member.name)
                if not member.isfile():
                    yield key, b"", f"tar member is a {_member_kind(member)}, not a file"
                    continue
                try:
                    data = archive.extractfile(member).read()
                except TAR_ERRORS as exc:
                    yield key, b"", f"tar member cut short (truncated archive): {exc}"
                    return
                yield key, data, ""
        except TAR_ERRORS as exc:
            yield f"{shard_key}#after-{members}-members", b"", \
                f"tar archive corrupt or truncated after {members} members: {exc}"


def read_tar_blocks(file: str, prefix: str, label_of: Optional[dict[str, int]] = None) -> Iterator:
    """Source-row blocks of RECORDS_PER_BLOCK members of one shard."""
    from pipeline.sources.units import chunked

    label_of = label_of or {}
    for chunk in chunked(tar_records(file, prefix), RECORDS_PER_BLOCK):
        keys, images, errors = (list(column) for column in zip(*chunk))
        yield source_table(keys, [label_of.get(k, NO_LABEL) for k in keys], images, errors)


class TarShardDatasource(Datasource):
    """One ReadTask per shard, streaming its members."""

    def __init__(self, path: str, labels: Optional[str] = None):
        labels_file = Path(labels).resolve() if labels else None
        # the labels file may lie among the shards: it is not a record
        self.shards = [(file, prefix) for file, prefix in tar_shards(path) if Path(file).resolve() != labels_file]
        self.label_of = read_labels_file(labels) if labels else None

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        label_of = self.label_of

        def make_task(file: str, prefix: str) -> ReadTask:
            return ReadTask(lambda: read_tar_blocks(file, prefix, label_of),
                            BlockMetadata(num_rows=None, size_bytes=os.path.getsize(file), exec_stats=None,
                                          input_files=[file]))

        return [make_task(file, prefix) for file, prefix in self.shards]


def read_tar_shards(path: str, labels: Optional[str] = None, limit: Optional[int] = None) -> Source:
    """Source rows, one per member of the shards PATH names; labels from a `KEY CLASS_INDEX` file."""
    dataset = ray.data.read_datasource(TarShardDatasource(path, labels))
    return Source(dataset.limit(limit) if limit is not None else dataset)


def count_tar_members(path: str) -> Optional[int]:
    """How many records the shards hold, from their headers, seeking past the data; None when a
    shard is compressed (counting it would mean decompressing it all once more, for a progress bar)."""
    shards = tar_shards(path)
    if any(is_tar_name(file) and not file.endswith(".tar") for file, _ in shards):  # a compressed shard
        return None
    total = 0
    for file, prefix in shards:
        if is_misplaced(file, prefix):
            total += 1  # read as one error row
            continue
        try:
            with tarfile.open(file) as archive:
                while (member := archive.next()) is not None:
                    total += not member.isdir()
                    archive.members.clear()  # TarFile keeps every header it has read
        except TAR_ERRORS:
            total += 1  # the shard reads as one error row (or a few): the count is for progress only
    return total


def tar_unit_readers(path: str, done: set[str]) -> list:
    """Readers for `pipeline.sources.units`: one unit per shard."""
    from pipeline.sources.units import shard_unit_id

    def reader_for(unit: str, file: str, prefix: str):
        return lambda: iter([(unit, read_tar_blocks(file, prefix))])

    units = [(shard_unit_id(file), file, prefix) for file, prefix in tar_shards(path)]
    return [reader_for(*unit) for unit in units if unit[0] not in done]
