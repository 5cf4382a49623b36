"""LMDB image databases (Caffe `Datum` or Caffe2 `TensorProtos` records) as a Ray Data source.

The database is opened read-only without a lock file (`lock=False`: nothing is written next to
data.mdb, and data.mdb is never modified), which is safe as long as no process writes to it while
it is read.

Splitting without listing keys: LMDB has no rank index (no "k-th key" lookup), and listing millions
of keys on the driver is what must be avoided. The driver reads only the entry count and the first
and last keys, and cuts the key space between them into byte-string ranges [lo, hi); each ReadTask
positions a cursor at `lo` (`set_range`) and reads until `hi`. The boundaries are increasing byte
strings, so the ranges cover every key exactly once whatever the keys look like; how the boundaries
are placed only affects how evenly the work is shared:
- keys with a zero-padded decimal prefix (convert_imageset's and our writer's `%08d_NAME`): split
  the integer range of that prefix evenly, which is even in records;
- any other keys: interpolate linearly on the bytes after the common prefix of the first and last
  key (even for hashes and other uniformly spread keys; uneven but still complete otherwise).
"""

from __future__ import annotations

import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import lmdb
import pyarrow as pa

from pipeline.sources.base import (BBOX_COLUMNS, LMDB_DATA_FILE, NO_LABEL, RAW_COLUMNS, RECORDS_PER_BLOCK,
                                   SOURCE_SCHEMA, Cut, Piece, Plan, SourceError)
from pipeline.sources.lmdb_records import DECODERS, KIND_NAMES, ImageRecord, RecordError, detect_record_kind

# records looked at, from the first, to tell Datum from TensorProtos by the first that decodes:
# damaged records before it are error rows, as anywhere else; a database none of whose first
# RECORDS_PROBED records decodes is taken for one that holds no image records
RECORDS_PROBED = 1000
INTERPOLATED_BYTES = 8
LMDB_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [(name, pa.int32()) for name in RAW_COLUMNS + BBOX_COLUMNS])
EMPTY_RECORD = ImageRecord(label=NO_LABEL, image=b"")  # what an error row carries


class LmdbInfo(NamedTuple):
    entries: int
    first_key: bytes
    last_key: bytes
    record_kind: str  # lmdb_records.DATUM or TENSOR_PROTOS
    size_bytes: int


def open_readonly(path: str | Path) -> lmdb.Environment:
    """Open the database in directory PATH read-only, without a lock file, after checking that
    data.mdb holds every page its meta page refers to (LMDB maps the file and would crash the process
    with SIGBUS on a page past the end of a truncated file)."""
    path = Path(path)
    data_file = path / LMDB_DATA_FILE
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory (an LMDB database is a directory holding {LMDB_DATA_FILE})")
    if not data_file.is_file():
        raise SourceError(f"{path}: not an LMDB database (no {LMDB_DATA_FILE} in it)")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, create=False, subdir=True,
                        max_readers=1, max_dbs=0)
    except lmdb.Error as exc:
        raise SourceError(f"{data_file}: not a readable LMDB database ({exc})") from None
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = data_file.stat().st_size
    if actual < needed:
        env.close()
        raise SourceError(f"{data_file}: truncated: {actual} bytes, but the database's pages "
                          f"take {needed} bytes")
    return env


def inspect_lmdb(path: str | Path) -> LmdbInfo:
    """Entry count, first and last key and record kind of the database in PATH; SourceError when it
    is empty or its records are neither Datum nor TensorProtos."""
    env = open_readonly(path)
    try:
        entries = env.stat()["entries"]
        if entries == 0:
            raise SourceError(f"{path}: the LMDB database holds no records")
        with env.begin() as txn:
            cursor = txn.cursor()
            cursor.last()
            last_key = cursor.key()
            cursor.first()
            first_key = cursor.key()
            first_reason = ""
            for _, (key, value) in zip(range(RECORDS_PROBED), cursor):
                try:
                    kind = detect_record_kind(value)
                    break
                except RecordError as exc:
                    first_reason = first_reason or f"key {key_text(key)!r}: {exc}"
            else:
                raise SourceError(f"{path}: the LMDB records are not image records "
                                  f"(first {min(entries, RECORDS_PROBED)} looked at; {first_reason})")
    except lmdb.Error as exc:
        raise SourceError(f"{path}: damaged LMDB database ({exc})") from None
    finally:
        env.close()
    return LmdbInfo(entries, first_key, last_key, kind, (Path(path) / LMDB_DATA_FILE).stat().st_size)


def key_text(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def split_key_range(first: bytes, last: bytes, parts: int) -> list[bytes]:
    """Increasing boundaries cutting the keys from FIRST to LAST into about PARTS ranges (see the
    module docstring); every boundary is > FIRST, so no range before the first boundary is empty."""
    if parts <= 1 or first >= last:
        return []
    first_digits, last_digits = re.match(rb"\d*", first).group(), re.match(rb"\d*", last).group()
    if first_digits and len(first_digits) == len(last_digits):
        width, low, high = len(first_digits), int(first_digits), int(last_digits)
        points = {low + (high - low + 1) * i // parts for i in range(1, parts)}
        return [b"%0*d" % (width, p) for p in sorted(points) if p > low]
    common = len(os.path.commonprefix([first, last]))
    prefix = first[:common]

    def as_int(key: bytes) -> int:
        return int.from_bytes(key[common:common + INTERPOLATED_BYTES].ljust(INTERPOLATED_BYTES, b"\0"), "big")

    low, high = as_int(first), as_int(last)
    points = {low + (high - low) * i // parts for i in range(1, parts)}
    return [prefix + p.to_bytes(INTERPOLATED_BYTES, "big") for p in sorted(points) if p > low]


def decode_row(record_kind: str, key: bytes, value: bytes) -> tuple[ImageRecord, str]:
    """(record, "") or (an empty record, the reason naming the key): a bad record never raises."""
    try:
        return DECODERS[record_kind](value), ""
    except RecordError as exc:
        return EMPTY_RECORD, f"LMDB record {key_text(key)!r} is not a valid {KIND_NAMES[record_kind]} record: {exc}"


def records_table(keys: list[str], records: list[ImageRecord], errors: list[str]) -> pa.Table:
    columns = list(zip(*records))
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.binary()),
         pa.array(errors, pa.string())] + [pa.array(c, pa.int32()) for c in columns[2:]],
        schema=LMDB_SCHEMA,
    )


def read_key_range(path: str, record_kind: str, lo: Optional[bytes], hi: Optional[bytes]) -> Iterator[pa.Table]:
    """Blocks of source rows for the keys in [LO, HI) (None: open end)."""
    env = open_readonly(path)
    keys, records, errors = [], [], []
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(lo) if lo is not None else cursor.first()
            for key, value in cursor.iternext() if positioned else ():
                if hi is not None and key >= hi:
                    break
                record, error = decode_row(record_kind, key, value)
                keys.append(key_text(key))
                records.append(record)
                errors.append(error)
                if len(keys) == RECORDS_PER_BLOCK:
                    yield records_table(keys, records, errors)
                    keys, records, errors = [], [], []
    except lmdb.Error as exc:
        # A damaged B-tree page: the keys past it cannot be found, so this is not one bad record.
        after = f"after key {keys[-1]!r}" if keys else f"from key {key_text(lo)!r}" if lo else "from the start"
        raise SourceError(f"{path}: damaged LMDB database: reading {after} failed ({exc})") from None
    finally:
        env.close()
    if keys:
        yield records_table(keys, records, errors)


def key_ranges(info: LmdbInfo, parts: int) -> list[tuple[Optional[bytes], Optional[bytes]]]:
    """About PARTS ranges [lo, hi) of the keys of the database INFO describes (None: an open end)."""
    bounds = [None] + split_key_range(info.first_key, info.last_key, max(1, min(parts, info.entries))) + [None]
    return list(zip(bounds[:-1], bounds[1:]))


def range_id(lo: Optional[bytes], hi: Optional[bytes]) -> str:
    return f"keys-{key_text(lo) if lo is not None else ''}..{key_text(hi) if hi is not None else ''}"


def plan_lmdb(path: str, labels: Optional[str], cut: Cut) -> Plan:
    """The pieces of the LMDB database in directory PATH: key ranges of about `Cut.piece_rows` records
    each (module docstring). Their bounds depend on the cluster's size, so they are not work units:
    `pipeline label` reads the database as one (`pipeline.sources.units`)."""
    if labels:
        raise SourceError("LMDB records carry their labels; --labels is for image folders")
    path = str(Path(path).resolve())
    info = inspect_lmdb(path)
    pieces = [Piece(range_id(lo, hi), None, partial(read_key_range, path, info.record_kind, lo, hi))
              for lo, hi in key_ranges(info, math.ceil(info.entries / cut.piece_rows(info.entries)))]
    records = info.entries if cut.limit is None else min(cut.limit, info.entries)
    return Plan("LMDB", pieces, records, exact_count=True, limit=cut.limit, schema=LMDB_SCHEMA,
                size_bytes=info.size_bytes)
