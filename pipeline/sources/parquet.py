"""Parquet shards with columns `key` (string), `image` (binary) and `label` (int), as written by
`pipeline prepare`; an `error` column, when present, carries records that prepare could not read.

Shards written by Hugging Face `datasets` (ImageNet's validation split as `validation-*.parquet`)
are read too: their `image` is a struct whose `bytes` field holds the encoded image, and they have no
`key`. A row without a key column is keyed by its shard's file name (its path from the folder
holding all the shards, for a glob over folders) and row number
(`validation-00000-of-00014.parquet#000042`): unique and the same on every run, as label's resume
needs.

A column of a type that cannot hold what it is for is refused before the run, naming the file and the
column (`_shard_metadata`); a value its type allows but a source row cannot hold (a uint64 label past
int64) makes its row an error row, and a key of bytes that are not UTF-8 is escaped (`utf8_key`).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.classes import NUM_CLASSES
from pipeline.sources.base import (NO_LABEL, RECORDS_PER_BLOCK, SOURCE_SCHEMA, Cut, Piece, Plan, SourceError,
                                   is_glob, names_below_common_folder, recut_rows, shard_unit_id, source_table,
                                   utf8_key)

INT64_MAX = 2**63 - 1  # the largest label the source rows' int64 label column holds


def parquet_files(path: str) -> list[str]:
    """The .parquet files PATH names: a file, a folder of shards or a glob."""
    if is_glob(path):
        files = sorted(glob.glob(path))
    elif Path(path).is_dir():
        files = sorted(str(p) for p in Path(path).glob("*.parquet"))
    else:
        files = [path]
    if not files:
        raise SourceError(f"{path}: no .parquet files")
    return files


def _shard_metadata(file: str) -> pq.FileMetaData:
    """A shard's footer, read up front so a damaged shard is named before anything runs."""
    try:
        metadata = pq.read_metadata(file)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{file}: not a readable Parquet file ({exc})") from None
    schema = metadata.schema.to_arrow_schema()
    if "image" not in schema.names:
        raise SourceError(f"{file}: Parquet shards need an image column (the encoded image); its columns are "
                          f"{', '.join(schema.names)}")
    image = schema.field("image").type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
            or pa.types.is_struct(image) and image.get_field_index("bytes") >= 0):
        raise SourceError(f"{file}: the image column must hold the encoded image (binary), or a struct with a "
                          f"bytes field as Hugging Face datasets write it; it is {image}")
    if pa.types.is_struct(image) and not _casts_to(image.field("bytes").type, pa.binary()):
        raise SourceError(f"{file}: the bytes field of the image column must hold the encoded image (binary); "
                          f"it is {image.field('bytes').type}")
    if "key" in schema.names and not _casts_to(schema.field("key").type, pa.string()):
        raise SourceError(f"{file}: the key column must hold the records' names (text, bytes or numbers); "
                          f"it is {schema.field('key').type}")
    if "error" in schema.names and not _is_text(schema.field("error").type):
        raise SourceError(f"{file}: the error column must hold text (why a record could not be read, empty for a "
                          f"good one); it is {schema.field('error').type}")
    return metadata


def _casts_to(column: pa.DataType, target: pa.DataType) -> bool:
    """Whether Arrow casts a COLUMN type to TARGET (its values may still fail: bytes that are not UTF-8)."""
    try:
        pa.array([], column).cast(target)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False
    return True


def _is_text(column: pa.DataType) -> bool:
    """Whether COLUMN holds text, or only nulls (a column of no errors)."""
    return (pa.types.is_string(column) or pa.types.is_large_string(column) or pa.types.is_string_view(column)
            or pa.types.is_null(column))


def source_columns(*shards: pq.FileMetaData) -> list[str]:
    """The columns that make source rows, held by any of SHARDS (one without `label` gets NO_LABEL
    for its rows; the other shards' labels are still read)."""
    names = set().union(*(m.schema.to_arrow_schema().names for m in shards))  # top-level: the image may be a struct
    return [c for c in ("key", "image", "label", "error") if c in names]


def row_keys(shard_name: str, rows: range) -> list[str]:
    """The keys of ROWS of a shard without keys: its name and the row number (`SHARD.parquet#000042`)."""
    return [f"{shard_name}#{row:06d}" for row in rows]


def to_source_rows(table: pa.Table, shard_name: str, first_row: int) -> pa.Table:
    """Cast a block of a shard's rows, the first of them its row FIRST_ROW, to the source-row schema:
    missing key -> SHARD_NAME and the row number, missing label -> NO_LABEL, missing error -> ""."""
    n = table.num_rows
    rows = range(first_row, first_row + n)
    if "key" not in table.column_names:
        key = pa.array(row_keys(shard_name, rows), pa.string())
    else:
        key = string_keys(table.column("key"))
        if key.null_count:  # keyed as a shard without keys keys it: the output must name every row
            key = pc.coalesce(key, pa.array(row_keys(shard_name, rows), pa.string()))
    label = table.column("label") if "label" in table.column_names else pa.nulls(n, pa.int64())
    image = table.column("image")
    if pa.types.is_struct(image.type):
        image = pc.struct_field(image, "bytes")
    image = image.cast(pa.binary())
    error = table.column("error").cast(pa.string()).fill_null("") if "error" in table.column_names \
        else pa.array([""] * n)
    error = pc.if_else(pc.is_null(image), pc.if_else(pc.equal(error, ""), "no image bytes", error), error)
    if pa.types.is_uint64(label.type):
        label, error = _int64_labels(label, error)
    label = label.cast(pa.int64()).fill_null(NO_LABEL)
    return pa.Table.from_arrays([key, label, image.fill_null(b""), error], schema=SOURCE_SCHEMA)


def string_keys(key: pa.ChunkedArray) -> pa.ChunkedArray:
    """KEY as text; keys held as bytes that are not UTF-8 escaped as `utf8_key` escapes file names."""
    try:
        return key.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.chunked_array([pa.array([None if value is None else utf8_key(value.decode("utf-8", "surrogateescape"))
                                           for value in key.to_pylist()], pa.string())])


def _int64_labels(label: pa.ChunkedArray, error: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """A uint64 LABEL column whose values the int64 label column cannot hold made null, and ERROR set on
    their rows, which become error rows."""
    past = pc.fill_null(pc.greater(label, pa.scalar(INT64_MAX, pa.uint64())), False)
    if not pc.any(past).as_py():
        return label, error
    errors = [(reason or f"label {value} out of range 0..{NUM_CLASSES - 1}") if too_big else reason
              for value, too_big, reason in zip(label.to_pylist(), past.to_pylist(), error.to_pylist())]
    return pc.if_else(past, pa.scalar(None, label.type), label), pa.chunked_array([pa.array(errors, pa.string())])


def read_row_groups(file: str, name: str, row_groups: list[int], columns: list[str]) -> Iterator[pa.Table]:
    """Source-row blocks of RECORDS_PER_BLOCK rows from ROW_GROUPS (consecutive) of one shard, called
    NAME in generated keys (`names_below_common_folder`). A row group whose pages cannot be read (the
    footer was checked before the run) gives an error row for each of its rows not read."""
    shard = pq.ParquetFile(file)
    row = sum(shard.metadata.row_group(index).num_rows for index in range(row_groups[0])) if row_groups else 0
    for group in row_groups:
        group_rows, read = shard.metadata.row_group(group).num_rows, 0
        try:
            for batch in shard.iter_batches(batch_size=RECORDS_PER_BLOCK, row_groups=[group], columns=columns):
                yield to_source_rows(pa.Table.from_batches([batch]), name, row + read)
                read += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            yield unreadable_rows(shard, name, group, row, read, exc)
        row += group_rows


def unreadable_rows(shard: pq.ParquetFile, name: str, group: int, first_row: int, read: int,
                    exc: Exception) -> pa.Table:
    """Error rows for the rows of row GROUP (its first row is the shard's FIRST_ROW) after the READ
    first ones, which failed with EXC: keyed by the shard's key column when that column still reads,
    else by shard name and row number, as shards without keys are."""
    keys = row_keys(name, range(first_row + read, first_row + shard.metadata.row_group(group).num_rows))
    if "key" in shard.schema_arrow.names:
        try:
            keys = string_keys(shard.read_row_group(group, columns=["key"]).column("key")).to_pylist()[read:]
        except (pa.ArrowException, OSError):
            pass  # the generated keys above
    reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return source_table(keys, [NO_LABEL] * len(keys), [b""] * len(keys),
                        [f"damaged Parquet row group {group} ({reason})"] * len(keys))


def row_group_runs(shard: pq.FileMetaData, max_rows: int) -> list[tuple[list[int], int]]:
    """SHARD's row groups cut into runs of consecutive ones of at most MAX_ROWS rows (a larger row
    group is a run of its own): (row group indices, rows) each."""
    runs: list[tuple[list[int], int]] = []
    row_groups, rows = [], 0
    for index in range(shard.num_row_groups):
        if row_groups and rows + shard.row_group(index).num_rows > max_rows:
            runs.append((row_groups, rows))
            row_groups, rows = [], 0
        row_groups.append(index)
        rows += shard.row_group(index).num_rows
    return runs + [(row_groups, rows)] if row_groups else runs


def check_label_column(file: str, shard: pq.FileMetaData) -> None:
    """Refuse (SourceError) a shard whose label column holds something else than class indices."""
    schema = shard.schema.to_arrow_schema()
    label = schema.field("label").type if "label" in schema.names else None
    if label is not None and not (pa.types.is_integer(label) or pa.types.is_null(label)):
        raise SourceError(f"{file}: the label column must hold class indices (integers); it is {label}")


def row_group_pieces(files: list[str], metadata: list[pq.FileMetaData], columns: list[list[str]],
                     cut: Cut) -> list[Piece]:
    """A piece per run of consecutive row groups of a shard of at most `Cut.piece_rows` rows (a larger row
    group is a run of its own), reading COLUMNS of its shard; the units in `Cut.done` left out. A shard
    of one run is one piece with the shard's own id (`shard_unit_id`), a run of a shard of several runs
    has the shard's id and its first row group's index (`-rgNNNNN`)."""
    max_rows = cut.piece_rows(sum(shard.num_rows for shard in metadata))
    pieces = []
    for file, name, shard, shard_columns in zip(files, names_below_common_folder(files), metadata, columns):
        runs = row_group_runs(shard, max_rows)
        for row_groups, rows in runs:
            unit = shard_unit_id(file) + (f"-rg{row_groups[0]:05d}" if len(runs) > 1 else "")
            if unit not in cut.done:
                pieces.append(Piece(unit, rows, partial(read_row_groups, file, name, row_groups, shard_columns),
                                    [file]))
    return pieces


def plan_parquet(path: str, labels: Optional[str], cut: Cut) -> Plan:
    """The pieces of the Parquet shards PATH names: runs of a shard's row groups (`row_group_pieces`),
    sized by `read_task_split` as image folders and LMDB are, or a work unit each. Ray's own Parquet
    reader makes one task per file (per ~128 MB of files), so a few large shards, or one small input,
    would be read and preprocessed on that many cores however many the cluster has, and a resume
    would redo a whole shard. A row group is the smallest piece a Parquet file can be read by: a shard
    written as one row group is still one piece (`pipeline prepare` writes row groups of 64 rows),
    whose rows are re-cut for preprocessing. Every shard's footer is checked up front, so a damaged
    shard is named before anything runs. `pipeline label` reads no labels: a label column of another
    type (class names) is neither checked nor read, and a shard of `pipeline prepare` is one unit when
    its --shard-size is at most the unit size (both 1,000 by default)."""
    if labels:
        raise SourceError("Parquet shards carry their labels in the `label` column; --labels is for image folders")
    files = parquet_files(path)
    metadata = [_shard_metadata(f) for f in files]
    if cut.units:
        columns = [[c for c in source_columns(shard) if c != "label"] for shard in metadata]
        pieces = row_group_pieces(files, metadata, columns, cut)
        return Plan("ParquetRowGroup", pieces, sum(piece.rows for piece in pieces))
    for file, shard in zip(files, metadata):
        check_label_column(file, shard)
    pieces = row_group_pieces(files, metadata, [source_columns(*metadata)] * len(files), cut)
    num_records = sum(m.num_rows for m in metadata)
    # a row group is read whole by one task, however large (`Source.recut_rows`)
    return Plan("ParquetRowGroup", pieces, num_records if cut.limit is None else min(cut.limit, num_records),
                exact_count=True, recut_rows=recut_rows([piece.rows for piece in pieces], num_records),
                limit=cut.limit)
