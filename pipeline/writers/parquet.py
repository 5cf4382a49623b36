"""`pipeline prepare`: an image folder -> Parquet shards of `key, image, label` (+ `error`), keeping
each image's encoded bytes exactly as stored on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from pipeline.output import OutputDirError, make_output_dir
from pipeline.sources.base import SMALL_READ_ROWS
from pipeline.sources.folder import folder_records_to_read, read_folder_records


SHARD_NAMES = "part-*.parquet"


def write_parquet_shards(images: str, out: str, labels: Optional[str] = None, shard_size: int = 1000,
                         overwrite: bool = False) -> dict:
    """Write OUT/part-NNNNN.parquet; the shards appear, under their names, only once all are
    complete. Returns counts.

    OUT must hold no shards already: a reader of the folder would read the old ones with the new.
    With OVERWRITE the old shards are deleted once the new ones are written. Unreadable files are
    kept as rows with an `error`, so evaluating the shards accounts for them."""
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    records = folder_records_to_read(images, labels)  # before the output folder is made
    out_dir = Path(out)
    old_shards = sorted(out_dir.glob(SHARD_NAMES)) if out_dir.is_dir() else []
    if old_shards and not overwrite:
        raise OutputDirError(f"{out} already holds {len(old_shards)} Parquet shards, which would be read with the "
                             "new ones: give a new --out, or pass --overwrite to replace them")
    make_output_dir(out)
    written, errors = [], 0
    for shard, start in enumerate(range(0, len(records), shard_size)):
        table = read_folder_records(images, records[start:start + shard_size])
        errors += sum(1 for e in table.column("error").to_pylist() if e)
        partial = out_dir / f".part-{shard:05d}.parquet.partial"  # hidden: readers of the folder skip it
        pq.write_table(table, partial, row_group_size=SMALL_READ_ROWS)
        written.append(partial)
    for old in old_shards:
        old.unlink()
    for shard, partial in enumerate(written):
        os.replace(partial, out_dir / f"part-{shard:05d}.parquet")
    return {"records": len(records), "shards": len(written), "unreadable": errors}
