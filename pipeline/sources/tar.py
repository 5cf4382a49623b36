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

WebDataset sidecars are read into their sample rather than passed on (`Sample`): the members of one
sample share a key (the member path up to the first "." of its base name) and sit next to each
other, `n0001.jpg`, `n0001.cls`, `n0001.json`. A `.cls` (ASCII text holding a class index) labels
its sample's images, a `.json` is its metadata; a `.cls` that holds no class index makes its images
error rows, and a second `.cls` or `.json` of a sample is an error row. A sample with no image has no
sidecars: a lone `meta.json` is passed on as any member. Runs never start inside a sample holding a
sidecar.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import tarfile
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional

import pyarrow as pa
import ray

from pipeline.sources.base import (NO_LABEL, RECORDS_PER_BLOCK, Cut, Piece, Plan, SourceError, chunked, is_glob,
                                   is_tar_name, names_below_common_folder, read_task_target, recut_rows,
                                   shard_unit_id, source_table, walk_files)
from pipeline.sources.labels import CLASS_INDEX, read_labels_file

TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
# WebDataset's sidecars: a member holding its sample's class index, and one holding its metadata
SIDECARS = ("cls", "json")
# The members of a sample held until it ends, since its .cls may come after its images. Samples are a
# few members; a shard whose members share a key for other reasons (`frame.000001.jpg`, ...) is then
# not held whole in memory: past this many members its images are passed on, and a sidecar is not read.
SAMPLE_HOLD = 64
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


def member_sample(key: str, regular: bool = True) -> tuple[str, str]:
    """(sample key, sidecar kind) of the member KEY, split as WebDataset splits a member path: at the
    first "." of its base name (`d/n0001.seg.png` is of sample `d/n0001`). The kind is "cls" or "json"
    for a sidecar (a REGULAR file so named, any case), "" for a record of its own."""
    dot = key.find(".", key.rfind("/") + 1)
    if dot < 0:
        return key, ""
    extension = key[dot + 1:].lower()
    return key[:dot], extension if regular and extension in SIDECARS else ""


class TarMember(NamedTuple):
    """A member as it is read, before it is made a row of its sample."""

    index: int  # its record number in the shard (members that are not directories, in stream order)
    key: str
    sample: Optional[str]  # its sample's key; None for a row of no sample (the damage row)
    sidecar: str  # `member_sample`'s kind: "" for a record of its own
    data: bytes
    error: str


class TarRow(NamedTuple):
    """A source row of a shard, and the record number of the member it is."""

    index: int
    key: str
    data: bytes
    error: str
    label: int  # the class index its sample's .cls holds, NO_LABEL without one


def sidecar_label(member: TarMember) -> tuple[int, str]:
    """(class index, "") from a .cls MEMBER, or (NO_LABEL, why not) when it does not hold one."""
    text = member.data.strip().decode("ascii", "replace")
    if CLASS_INDEX.fullmatch(text):
        return int(text), ""
    return NO_LABEL, (f"its sample's {member.key} does not hold a class index (ASCII digits): "
                      f"{member.data[:40]!r}")


class Sample:
    """The members of one WebDataset sample (the consecutive members of one key), as they are read. They
    are held until the sample ends, or reaches SAMPLE_HOLD members (its .cls may come after its images);
    then, when a record is among them, its first .cls and first .json are read into it, and every other
    member is passed on as a row: a record labelled by the .cls, a second sidecar of a kind as an error
    row. A sample of sidecars alone has none: its members are passed on as any member is (a lone
    `meta.json` fails decoding, as in an image folder). The reader and the header scan both make rows
    this way (`sample_rows`, `SampleScan`)."""

    def __init__(self, name: Optional[str]):
        self.name = name
        self.seen = 0
        self.held: list[TarMember] = []
        self.read: Optional[dict[str, TarMember]] = None  # the sidecars read, by kind, once decided
        self.has_record = False
        self.label, self.label_error = NO_LABEL, ""

    def add(self, member: TarMember) -> list[TarRow]:
        """The rows MEMBER lets out."""
        self.seen += 1
        if self.read is not None:  # past the members held
            return self._rows([member])
        self.held.append(member)
        return self._decide() if self.seen >= SAMPLE_HOLD else []

    def finish(self) -> list[TarRow]:
        """The rows still held when the sample ends."""
        return self._decide() if self.read is None else []

    def _decide(self) -> list[TarRow]:
        self.read = {}
        self.has_record = any(not member.sidecar for member in self.held)
        if self.has_record:
            for member in self.held:
                if member.sidecar:
                    self.read.setdefault(member.sidecar, member)
            if "cls" in self.read:
                self.label, self.label_error = sidecar_label(self.read["cls"])
        rows = self._rows([member for member in self.held if self.read.get(member.sidecar) is not member])
        self.held = []
        return rows

    def _rows(self, members: list[TarMember]) -> list[TarRow]:
        rows = []
        for member in members:
            if member.sidecar and self.has_record:
                rows.append(TarRow(member.index, member.key, b"", self._unread_sidecar(member), NO_LABEL))
            elif member.sidecar:  # a sample of sidecars alone: they are members as any other
                rows.append(TarRow(member.index, member.key, member.data, member.error, NO_LABEL))
            else:
                rows.append(TarRow(member.index, member.key, member.data, member.error or self.label_error,
                                   self.label))
        return rows

    def _unread_sidecar(self, member: TarMember) -> str:
        first = self.read.get(member.sidecar)
        if first is not None:
            return f"a second .{member.sidecar} sidecar of sample {self.name}: its first one, {first.key}, is read"
        return (f"a .{member.sidecar} sidecar after the first {SAMPLE_HOLD} members of sample {self.name}, which "
                "are not held for it")


def sample_rows(members: Iterable[TarMember]) -> Iterator[TarRow]:
    """The rows of MEMBERS (a shard's, or a run's, in stream order), made sample by sample."""
    sample = None
    for member in members:
        if sample is None or member.sample is None or member.sample != sample.name:
            if sample is not None:
                yield from sample.finish()
            sample = Sample(member.sample)
        yield from sample.add(member)
    if sample is not None:
        yield from sample.finish()


@dataclass(frozen=True)
class MemberRun:
    """Consecutive records (members that are not directories) of one shard: the byte offset of the
    first one's header, how many to read from there (None: on to the end of the shard, so that
    damage past the last member the scan saw is still read and reported), and how many records of
    the shard come before it."""

    offset: int = 0
    records: Optional[int] = None
    before: int = 0
    rows: Optional[int] = None  # how many rows its RECORDS read as (sidecars read into their sample are not)


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
    read_sidecars: array  # the record numbers of the sidecars read into their sample, which are no rows
    inside: array  # the record numbers inside a sample holding sidecars, where no run may start

    def rows(self, first: int, records: Optional[int] = None) -> int:
        """How many rows RECORDS records from record FIRST (all the rest by default) read as."""
        end = len(self.offsets) if records is None else first + records
        return end - first - (bisect_left(self.read_sidecars, end) - bisect_left(self.read_sidecars, first))

    def run_start(self, record: int) -> int:
        """The first record from RECORD on that a run may start at."""
        at = bisect_left(self.inside, record)
        while at < len(self.inside) and self.inside[at] == record:
            at, record = at + 1, record + 1
        return record


class SampleScan:
    """Which records of a shard are sidecars read into their sample, and which lie inside a sample that
    holds sidecars, from its member headers in stream order: the reader's `Sample`s, made on headers for
    the samples that hold a sidecar (a sample of one image, the common case, costs a key comparison)."""

    def __init__(self) -> None:
        self.read_sidecars, self.inside = array("q"), array("q")
        self.name: Optional[str] = None  # the key of the sample being scanned
        self.start = 0  # its first record
        self.sample: Optional[Sample] = None  # made at its first sidecar
        self.sidecars: list[int] = []
        self.rows: set[int] = set()

    def add(self, index: int, key: str, regular: bool) -> None:
        name, sidecar = member_sample(key, regular)
        if name != self.name:
            self.end(index)
            self.name, self.start = name, index
        if sidecar and self.sample is None:
            self.sample = Sample(name)
            for record in range(self.start, index):  # the records before it: none of them is a sidecar
                self._add(TarMember(record, "", name, "", b"", ""))
        if self.sample is not None:
            if sidecar:
                self.sidecars.append(index)
            self._add(TarMember(index, key, name, sidecar, b"", ""))

    def end(self, index: int) -> None:
        """End the sample being scanned, whose last record is the one before record INDEX."""
        if self.sample is None:
            return
        self.rows.update(row.index for row in self.sample.finish())
        self.read_sidecars.extend(i for i in self.sidecars if i not in self.rows)
        self.inside.extend(range(self.start + 1, index))
        self.sample, self.sidecars, self.rows = None, [], set()

    def _add(self, member: TarMember) -> None:
        self.rows.update(row.index for row in self.sample.add(member))


def scan_shard(file: str, prefix: str, with_keys: bool = False) -> Optional[ShardScan]:
    """The records of an uncompressed shard, from its headers alone (seeking past the data). None when
    it is compressed or not a tar from its start. A shard damaged part-way gives the records before
    the damage: its last run reads on and reports the damage, as a whole read does."""
    if not is_splittable(file, prefix):
        return None
    offsets, keys, samples = array("q"), [], SampleScan()
    archive = None
    try:
        archive = tarfile.open(file, mode="r:")
        while (member := archive.next()) is not None:
            archive.members.clear()  # TarFile keeps every header it has read
            if not member.isdir():
                key = member_key(prefix, member)
                samples.add(len(offsets), key, member.isfile())
                offsets.append(member.offset)
                if with_keys:
                    keys.append(key)
    except TAR_ERRORS:
        if not offsets:
            return None
    finally:
        if archive is not None:
            archive.close()
    samples.end(len(offsets))
    return ShardScan(offsets, keys, not archive.pax_headers, samples.read_sidecars, samples.inside)


def member_runs(scan: Optional[ShardScan], size: int) -> list[MemberRun]:
    """A shard's records (its SCAN) cut into runs of SIZE, each starting at the first record from its
    place on that is not inside a sample holding sidecars; the whole shard as one run when it holds at
    most SIZE records or cannot be cut. The first run starts at the shard's start and the last one
    reads to its end, so together they read exactly what a whole read does."""
    if scan is None or not scan.cuttable or len(scan.offsets) <= size:
        return [WHOLE_SHARD]
    firsts = sorted({scan.run_start(first) for first in range(0, len(scan.offsets), size)} - {len(scan.offsets)})
    if len(firsts) == 1:
        return [WHOLE_SHARD]
    ends = firsts[1:] + [None]
    return [MemberRun(scan.offsets[first] if first else 0, end - first if end else None, first,
                      scan.rows(first, end - first) if end else None)
            for first, end in zip(firsts, ends)]


def tar_rows(file: str, prefix: str, run: MemberRun = WHOLE_SHARD) -> Iterator[TarRow]:
    """Every row of RUN of the shard (all of it by default), in stream order, a sample's rows when the
    sample ends (`Sample`)."""
    shard_key = prefix.rstrip("/") or Path(file).name
    if is_misplaced(file, prefix):
        yield TarRow(run.before, shard_key, b"", "not a tar shard (its name does not end in .tar, .tar.gz or .tgz)",
                     NO_LABEL)
        return
    try:
        stream = open(file, "rb")
    except OSError as exc:
        yield TarRow(run.before, shard_key, b"", f"not a readable tar archive: {exc}", NO_LABEL)
        return
    with stream:
        try:
            stream.seek(run.offset)
            # a run part-way is of an uncompressed shard: not sniffed for compression, which a
            # member name beginning like a compressed stream's magic bytes would fool
            archive = tarfile.open(fileobj=stream, mode="r|*" if run.offset == 0 else "r|")
        except TAR_ERRORS as exc:
            yield TarRow(run.before, shard_key, b"", f"not a readable tar archive: {exc}", NO_LABEL)
            return
        with archive:
            yield from sample_rows(_run_members(archive, stream, prefix, run, shard_key))


def tar_records(file: str, prefix: str, run: MemberRun = WHOLE_SHARD) -> Iterator[tuple[str, bytes, str]]:
    """(key, bytes, error) of every row of RUN of the shard (`tar_rows`)."""
    return ((row.key, row.data, row.error) for row in tar_rows(file, prefix, run))


def _run_members(archive: tarfile.TarFile, stream: BinaryIO, prefix: str, run: MemberRun,
                 shard_key: str) -> Iterator[TarMember]:
    """The members of RUN as ARCHIVE, opened on STREAM at the run's offset, reads them, then the damage
    row of a shard that ends otherwise than at its end-of-archive block."""
    members = run.before
    try:
        for member in archive:
            if member.isdir():
                continue
            members += 1
            key = member_key(prefix, member)
            sample, sidecar = member_sample(key, member.isfile())
            if not member.isfile():
                yield TarMember(members - 1, key, sample, "", b"",
                                f"tar member is a {_member_kind(member)}, not a file")
            elif is_tar_name(member.name):
                yield TarMember(members - 1, key, sample, "", b"", NESTED_TAR)
            else:
                try:
                    data = archive.extractfile(member).read()
                except TAR_ERRORS as exc:
                    yield TarMember(members - 1, key, sample, "", b"",
                                    f"tar member cut short (truncated archive): {exc}")
                    return
                yield TarMember(members - 1, key, sample, sidecar, data, "")
            if members - run.before == run.records:
                return  # before the next header: it is the next run's
        damage = _damage_where_members_stopped(archive, stream, run.offset)
    except TAR_ERRORS as exc:
        damage = str(exc)
    if damage:
        yield TarMember(members, f"{shard_key}#after-{members}-members", None, "", b"",
                        f"tar archive corrupt or truncated after {members} members: {damage}")


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
    for chunk in chunked(tar_rows(file, prefix, run), RECORDS_PER_BLOCK):
        # the labels file is the user's explicit input: it wins over a sample's .cls
        yield source_table([row.key for row in chunk], [label_of.get(row.key, row.label) for row in chunk],
                           [row.data for row in chunk], [row.error for row in chunk])


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
    # the rows the run reads as: the sidecars read into their sample are none (`MemberRun.rows`)
    return Piece(unit, run.rows, TarRead(file, prefix, run, labels), [file])


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
        return scan.rows(run.before, run.records)
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
