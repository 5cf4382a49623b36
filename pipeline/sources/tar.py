"""Tar archives of images, WebDataset-style: one or many `.tar` shards (a file, a folder of shards
searched recursively, or a glob), every regular member one record, read in stream order.

An uncompressed shard can be cut into runs of consecutive members, each read by its own task from the
offset of its first header: one big archive (ImageNet's 50,000 validation images in one `.tar`) then
spreads over the cluster. Where the runs start is found by reading every member header once, seeking
past the data (about 1 s per 50,000 members), and only when the shards are too few for the cluster
(`worth_cutting`). A compressed shard (`.tar.gz`, `.tgz`) cannot be entered part-way and is one task;
its records are then re-cut into blocks for preprocessing (`Source.recut_rows`).

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
import re
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Optional

import pyarrow as pa
import ray

from pipeline.sources.base import (NO_LABEL, RECORDS_PER_BLOCK, Cut, Piece, Plan, SourceError, chunked, is_glob,
                                   is_tar_name, names_below_common_folder, read_task_target, recut_rows,
                                   shard_unit_id, source_table, walk_files)
from pipeline.sources.labels import read_labels_file

TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
# ILSVRC2012_img_train.tar holds a .tar per class: members are read as records, not opened as shards
NESTED_TAR = ("a tar archive inside the archive (as in ILSVRC2012_img_train.tar): extract the outer archive "
              "and pass the folder of the .tar shards it holds")


def tar_shards(path: str) -> list[tuple[str, str]]:
    """(file, key prefix) for every file PATH names, in a fixed order: a shard file, every file of a
    glob, or every file below a folder as the image folder reader walks it (hidden files and the
    top-level labels.txt left out). A file not named as a shard is listed too: it is an error row
    (see `is_misplaced`), never skipped silently."""
    if is_glob(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        names = names_below_common_folder(files) if files else []
    elif Path(path).is_dir():
        names = list(walk_files(path))
        files = [os.path.join(path, name) for name in names]
    elif Path(path).is_file():
        return [(path, "")]
    else:
        raise SourceError(f"{path}: no such file or directory")
    if not any(is_tar_name(file) for file in files):
        raise SourceError(f"{path}: no .tar shards")
    return [(file, name + "/") for file, name in zip(files, names)]


def is_misplaced(file: str, prefix: str) -> bool:
    """Whether FILE, listed by `tar_shards` with PREFIX, is a file of a folder or glob of shards that is
    not named as a shard (a lone file the user named is read as a tar whatever its name)."""
    return bool(prefix) and not is_tar_name(file)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "link"
    return "device or special file" if member.isdev() or member.isfifo() else "non-regular entry"


def member_key(prefix: str, member: tarfile.TarInfo) -> str:
    return prefix + posixpath.normpath(member.name)


@dataclass(frozen=True)
class MemberRun:
    """Consecutive records (members that are not directories) of one shard: the byte offset of the
    first one's header, how many to read from there (None: on to the end of the shard, so that
    damage past the last member the scan saw is still read and reported), and how many records of
    the shard come before it."""

    offset: int = 0
    records: Optional[int] = None
    before: int = 0


WHOLE_SHARD = MemberRun()


def is_splittable(file: str, prefix: str) -> bool:
    """Whether the shard is an uncompressed tar, which a reader can enter at any member's header."""
    return not is_misplaced(file, prefix) and file.endswith(".tar")


class ShardScan(NamedTuple):
    """What one read of a shard's headers found."""

    offsets: array  # the header offset of every record, in stream order (8 bytes each: millions are small)
    keys: list[str]  # their keys, when asked for
    cuttable: bool  # False when a pax global header applies to every member after it: a run starting
    #                 later would read its members without it


def scan_shard(file: str, prefix: str, with_keys: bool = False) -> Optional[ShardScan]:
    """The records of an uncompressed shard, from its headers alone (seeking past the data). None when
    it is compressed or not a tar from its start. A shard damaged part-way gives the records before
    the damage: its last run reads on and reports the damage, as a whole read does."""
    if not is_splittable(file, prefix):
        return None
    offsets, keys = array("q"), []
    archive = None
    try:
        archive = tarfile.open(file, mode="r:")
        while (member := archive.next()) is not None:
            archive.members.clear()  # TarFile keeps every header it has read
            if not member.isdir():
                offsets.append(member.offset)
                if with_keys:
                    keys.append(member_key(prefix, member))
    except TAR_ERRORS:
        if not offsets:
            return None
    finally:
        if archive is not None:
            archive.close()
    return ShardScan(offsets, keys, not archive.pax_headers)


def member_runs(scan: Optional[ShardScan], size: int) -> list[MemberRun]:
    """A shard's records (its SCAN) cut into runs of SIZE; the whole shard as one run when it holds at
    most SIZE records or cannot be cut. The first run starts at the shard's start and the last one
    reads to its end, so together they read exactly what a whole read does."""
    if scan is None or not scan.cuttable or len(scan.offsets) <= size:
        return [WHOLE_SHARD]
    firsts = range(0, len(scan.offsets), size)
    return [MemberRun(scan.offsets[first] if first else 0, size if first != firsts[-1] else None, first)
            for first in firsts]


def tar_records(file: str, prefix: str, run: MemberRun = WHOLE_SHARD) -> Iterator[tuple[str, bytes, str]]:
    """(key, bytes, error) for every record of RUN of the shard (all of it by default), in stream order."""
    shard_key = prefix.rstrip("/") or Path(file).name
    if is_misplaced(file, prefix):
        yield shard_key, b"", "not a tar shard (its name does not end in .tar, .tar.gz or .tgz)"
        return
    members = run.before
    try:
        stream = open(file, "rb")
    except OSError as exc:
        yield shard_key, b"", f"not a readable tar archive: {exc}"
        return
    with stream:
        try:
            stream.seek(run.offset)
            # a run part-way is of an uncompressed shard: not sniffed for compression, which a
            # member name beginning like a compressed stream's magic bytes would fool
            archive = tarfile.open(fileobj=stream, mode="r|*" if run.offset == 0 else "r|")
        except TAR_ERRORS as exc:
            yield shard_key, b"", f"not a readable tar archive: {exc}"
            return
        with archive:
            try:
                for member in archive:
                    if member.isdir():
                        continue
                    members += 1
                    key = member_key(prefix, member)
                    if not member.isfile():
                        yield key, b"", f"tar member is a {_member_kind(member)}, not a file"
                    elif is_tar_name(member.name):
                        yield key, b"", NESTED_TAR
                    else:
                        try:
                            data = archive.extractfile(member).read()
                        except TAR_ERRORS as exc:
                            yield key, b"", f"tar member cut short (truncated archive): {exc}"
                            return
                        yield key, data, ""
                    if members - run.before == run.records:
                        return  # before the next header: it is the next run's
                damage = _damage_where_members_stopped(archive, stream, run.offset)
            except TAR_ERRORS as exc:
                damage = str(exc)
            if damage:
                yield f"{shard_key}#after-{members}-members", b"", \
                    f"tar archive corrupt or truncated after {members} members: {damage}"


def _damage_where_members_stopped(archive: tarfile.TarFile, raw: BinaryIO, start: int) -> Optional[str]:
    """Why ARCHIVE's members stopped, when it was not the end of the archive. Past the first member,
    tarfile ends the iteration without a word at a header it cannot parse or that is cut short, and
    every member after it would be lost silently. At a true end the block read there is the zero
    end-of-archive block and only zero padding follows, or the file ends right there. RAW is the
    file, whose byte START the archive's stream began at: an uncompressed archive's stopping block
    is read again from it (tarfile keeps no trace of it); a compressed one's is gone, and only what
    follows it can be looked at."""
    header = archive.offset
    comptype = getattr(archive.fileobj, "comptype", "tar")
    if comptype == "tar":
        raw.seek(start + header)
        block, rest = raw.read(tarfile.BLOCKSIZE), raw
        if len(block) < tarfile.BLOCKSIZE and block:
            return f"a member header cut short at byte {start + header}"
        if block.strip(b"\0"):
            return f"a damaged member header at byte {start + header}: the members after it cannot be read"
    else:
        if 0 < archive.fileobj.tell() - header < tarfile.BLOCKSIZE:
            return f"a member header cut short at byte {header} of the uncompressed archive"
        rest = archive.fileobj
    while chunk := rest.read(1 << 16):
        if chunk.strip(b"\0"):
            return (f"data after the end-of-archive block at byte {start + header} (archives joined end "
                    "to end, or a damaged header): the members after it cannot be read")
    # tarfile decompresses only the first of compressed streams joined end to end (`cat a.tar.gz
    # b.tar.gz`): what follows it is in its decompressor's unused data and the rest of the file,
    # after gzip's 8-byte trailer (CRC-32 and size), which tarfile does not read
    after_stream = getattr(getattr(archive.fileobj, "cmp", None), "unused_data", b"") + raw.read(1 << 16)
    if comptype in ("gz", "bz2", "xz") and after_stream[8 if comptype == "gz" else 0:].strip(b"\0"):
        return ("data after the end of the compressed stream (compressed archives joined end to end): "
                "the members after it cannot be read")
    return None


def read_tar_blocks(file: str, prefix: str, label_of: Optional[dict[str, int]] = None,
                    run: MemberRun = WHOLE_SHARD) -> Iterator[pa.Table]:
    """Source-row blocks of RECORDS_PER_BLOCK records of RUN of one shard."""
    label_of = label_of or {}
    for chunk in chunked(tar_records(file, prefix, run), RECORDS_PER_BLOCK):
        keys, images, errors = (list(column) for column in zip(*chunk))
        yield source_table(keys, [label_of.get(k, NO_LABEL) for k in keys], images, errors)


def labels_by_shard(shards: list[tuple[str, str]], label_of: dict[str, int]) -> dict[str, dict[str, int]]:
    """LABEL_OF split by the shard prefix its keys start with, so that a read task carries the labels
    of its own shard only (not a 50,000-line labels file per task)."""
    grouped: dict[str, dict[str, int]] = {prefix: {} for _, prefix in shards}
    if "" in grouped:  # a single shard file: its keys are bare member paths
        grouped[""] = label_of
        return grouped
    for key, label in label_of.items():
        slash = key.find("/")
        while slash >= 0 and key[:slash + 1] not in grouped:
            slash = key.find("/", slash + 1)
        if slash >= 0:
            grouped[key[:slash + 1]][key] = label
    return grouped


def worth_cutting(shards: list[tuple[str, str]]) -> bool:
    """Whether SHARDS are too few to keep the cluster busy a task each, so that cutting them into runs
    of members is worth a scan of their headers. An input of many shards (WebDataset's thousands) is
    never scanned: at that scale, with files out of the page cache, reading every header costs about
    as much as reading the archive."""
    return len(shards) < read_task_target()


# A shard read whole (compressed) carries all its labels, 50,000 for the validation set as one
# .tar.gz: beyond this many they go through the object store, not inside the task's function, which
# Ray warns about from 1 MiB.
LABELS_IN_TASK = 10_000


@dataclass(frozen=True)
class TarRead:
    """What one piece of a tar input reads: RUN of shard FILE, keyed under PREFIX, labelled from LABELS
    (the labels of the run's keys, in the object store past LABELS_IN_TASK)."""

    file: str
    prefix: str
    run: MemberRun
    labels: dict[str, int] | ray.ObjectRef

    def __call__(self) -> Iterator[pa.Table]:
        labels = ray.get(self.labels) if isinstance(self.labels, ray.ObjectRef) else self.labels
        return read_tar_blocks(self.file, self.prefix, labels, self.run)


def tar_piece(unit: str, file: str, prefix: str, run: MemberRun, label_of: dict[str, int]) -> Piece:
    labels = ray.put(label_of) if len(label_of) > LABELS_IN_TASK else label_of
    return Piece(unit, run.records, TarRead(file, prefix, run, labels), [file])


SPLIT_UNIT = re.compile(r"(.*)-m\d{9}")  # the id of a piece that is a run of a cut shard: SHARD_ID-mNNNNNNNNN


def input_shards(path: str, labels: Optional[str] = None) -> list[tuple[str, str]]:
    """`tar_shards` of PATH but the labels file LABELS, which may lie among the shards and is not a record."""
    if not labels:
        return tar_shards(path)
    labels_file = Path(labels).resolve()
    return [(file, prefix) for file, prefix in tar_shards(path) if Path(file).resolve() != labels_file]


def plan_tar(path: str, labels: Optional[str], cut: Cut) -> Plan:
    """The pieces of the shards PATH names, labels from a `KEY CLASS_INDEX` file: a shard each when
    there are enough shards to keep the cluster busy (no header scan, `worth_cutting`), otherwise runs
    of the shards' members of at most `Cut.piece_rows` records, so that one big archive still spreads
    over the cluster (and a resume of `pipeline label` redoes at most a unit). A shard of one piece has
    the shard's own id (`shard_unit_id`), a run of a cut shard the shard's id and how many records
    come before it (`-mNNNNNNNNN`). A read task carries the labels of its own run's keys only.

    The plan counts the rows the pieces read as (None when a shard was not scanned, or is compressed).
    Whether a shard is cut is decided afresh only for a shard none of whose units is in `Cut.done`: a
    resume (on another cluster, with shards added) cuts a shard exactly as the run that started it did."""
    shards = input_shards(path, labels)
    label_of = read_labels_file(labels) if labels else {}
    labels_of_shard = labels_by_shard(shards, label_of)
    cut_before = {match.group(1) for unit in cut.done if (match := SPLIT_UNIT.fullmatch(unit))}
    cut_now = worth_cutting(shards)
    todo = [(file, prefix, shard_id) for file, prefix in shards if (shard_id := shard_unit_id(file)) not in cut.done]
    scans = [scan_shard(file, prefix, with_keys=bool(label_of)) if cut_now or shard_id in cut_before else None
             for file, prefix, shard_id in todo]
    max_rows = cut.piece_rows(sum(len(scan.offsets) if scan else 1 for scan in scans))
    pieces, piece_rows = [], []
    for (file, prefix, shard_id), scan in zip(todo, scans):
        if shard_id in cut_before and not (scan and scan.cuttable):
            # read whole, it would label again the members of the parts already done
            raise SourceError(f"{file}: an earlier run into this output labelled it in parts, and its member "
                              "headers cannot be read now to find the same parts; restore the shard, or pass "
                              "--overwrite to label everything again")
        runs = member_runs(scan, max_rows)
        for run in runs:
            unit = shard_id + (f"-m{run.before:09d}" if len(runs) > 1 else "")
            if unit in cut.done:
                continue
            run_labels = labels_of_shard[prefix]
            if len(runs) > 1 and run_labels:
                run_keys = scan.keys[run.before:run.before + run.records if run.records else None]
                run_labels = {key: run_labels[key] for key in run_keys if key in run_labels}
            pieces.append(tar_piece(unit, file, prefix, run, run_labels))
            piece_rows.append(shard_rows(file, prefix, scan, run) if scan or cut_now else None)
    records = None if None in piece_rows else sum(piece_rows)  # a shard's runs together read as the shard
    return Plan("TarShard", pieces, records if records is None or cut.limit is None else min(cut.limit, records),
                recut_rows=recut_rows(piece_rows, records), limit=cut.limit)


def shard_rows(file: str, prefix: str, scan: Optional[ShardScan], run: MemberRun = WHOLE_SHARD) -> Optional[int]:
    """How many rows RUN of a shard (all of it by default) reads as, from the shard's SCAN
    (`scan_shard`): a shard that cannot be read counts as the one error row it reads as. None for a
    compressed shard: counting it would mean decompressing it all once more, for a progress bar."""
    if scan is not None:
        return run.records if run.records is not None else len(scan.offsets) - run.before
    return None if is_tar_name(file) and not is_splittable(file, prefix) else 1


def records_in(shards: list[tuple[str, str]], scans: Iterable[Optional[ShardScan]]) -> Optional[int]:
    """How many rows SHARDS read as, from their SCANS (see `shard_rows`), taken one at a time; None
    when not known."""
    total = 0
    for (file, prefix), scan in zip(shards, scans):
        rows = shard_rows(file, prefix, scan)
        if rows is None:
            return None
        total += rows
    return total


def count_tar_records(path: str) -> Optional[int]:
    """How many rows the shards PATH names read as, scanning their headers one shard at a time."""
    shards = tar_shards(path)
    return records_in(shards, (scan_shard(file, prefix) for file, prefix in shards))
