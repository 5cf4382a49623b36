"""Parquet shards with columns `key` (string), `image` (binary) and `label` (int), as written by
`pipeline prepare`; an `error` column, when present, carries records that prepare could not read."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from pipeline.runtime import map_fused_with_read
from pipeline.sources import NO_LABEL, RECORDS_PER_BLOCK, SOURCE_SCHEMA, Source, SourceError, is_glob


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
    missing = {"key", "image"} - set(metadata.schema.names)
    if missing:
        raise SourceError(f"{file}: Parquet shards need columns key and image; missing {sorted(missing)}")
    return metadata


def source_columns(*shards: pq.FileMetaData) -> list[str]:
    """The columns that make source rows, held by any of SHARDS (one without `label` gets NO_LABEL
    for its rows; the other shards' labels are still read)."""
    return [c for c in ("key", "image", "label", "error") if any(c in m.schema.names for m in shards)]


def to_source_rows(table: pa.Table) -> pa.Table:
    """Cast a shard's block to the source-row schema: missing label -> NO_LABEL, missing error -> ""."""
    n = table.num_rows
    label = table.column("label").cast(pa.int64()).fill_null(NO_LABEL) if "label" in table.column_names \
        else pa.array([NO_LABEL] * n, pa.int64())
    image = table.column("image").cast(pa.binary())
    error = table.column("error").fill_null("") if "error" in table.column_names else pa.array([""] * n)
    error = pc.if_else(pc.is_null(image), pc.if_else(pc.equal(error, ""), "no image bytes", error), error)
    return pa.Table.from_arrays(
        [table.column("key").cast(pa.string()), label, image.fill_null(b""), error], schema=SOURCE_SCHEMA
    )


def read_parquet_shards(path: str, labels: Optional[str] = None, limit: Optional[int] = None) -> Source:
    """Source rows from Parquet shards."""
    if labels:
        raise SourceError("Parquet shards carry their labels in the `label` column; --labels is for image folders")
    files = parquet_files(path)
    metadata = [_shard_metadata(f) for f in files]
    columns = source_columns(*metadata)
    num_records = sum(m.num_rows for m in metadata)
    ds = ray.data.read_parquet(files).select_columns(columns)
    if limit is not None:
        ds, num_records = ds.limit(limit), min(limit, num_records)
    return Source(map_fused_with_read(ds, to_source_rows, batch_format="pyarrow", batch_size=None), num_records)


def parquet_unit_readers(path: str, done: set[str]) -> list:
    """Readers for `pipeline.sources.units`: one unit per shard, read a few row groups at a time.
    Every shard's footer is checked up front, so a damaged shard is named before anything runs."""
    from pipeline.sources.units import shard_unit_id

    def reader_for(unit: str, file: str, columns: list[str]):
        def units():
            batches = pq.ParquetFile(file).iter_batches(batch_size=RECORDS_PER_BLOCK, columns=columns)
            yield unit, (to_source_rows(pa.Table.from_batches([batch])) for batch in batches)

        return units

    readers = []
    for file in parquet_files(path):
        columns = source_columns(_shard_metadata(file))
        unit = shard_unit_id(file)
        if unit not in done:
            readers.append(reader_for(unit, file, columns))
    return readers
