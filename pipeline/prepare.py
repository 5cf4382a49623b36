"""`pipeline prepare`: an image folder -> Parquet shards of `key, image, label` (+ `error`), keeping
each image's encoded bytes exactly as stored on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from pipeline.output import make_output_dir
from pipeline.sources import SMALL_READ_ROWS
from pipeline.sources.folder import folder_records_to_read, read_folder_records


def write_parquet_shards(images: str, out: str, labels: Optional[str] = None, shard_size: int = 1000) -> dict:
    """Write OUT/part-NNNNN.parquet; each shard appears only once complete. Returns counts.

    Unreadable files are kept as rows with an `error`, so evaluating the shards accounts for them."""
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    records = folder_records_to_read(images, labels)  # before the output folder is made
    make_output_dir(out)
    shards, errors = 0, 0
    for shard, start in enumerate(range(0, len(records), shard_size)):
        table = read_folder_records(images, records[start:start + shard_size])
        errors += sum(1 for e in table.column("error").to_pylist() if e)
        final = Path(out) / f"part-{shard:05d}.parquet"
        partial = final.with_suffix(".parquet.partial")
        pq.write_table(table, partial, row_group_size=SMALL_READ_ROWS)
        os.replace(partial, final)
        shards += 1
    return {"records": len(records), "shards": shards, "unreadable": errors}
