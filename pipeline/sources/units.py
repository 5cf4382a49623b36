"""Work units: an input split into pieces that are read, labelled and committed one by one, so that
a resumed `pipeline label` run skips the pieces already done.

A unit has a stable id (file-name safe, the same on every run over the same input). Unit-tagged
blocks are source-row blocks (the contract in pipeline.sources) with two more columns:

- ``unit``       string: the id of the unit the row belongs to.
- ``unit_rows``  int64: the unit's number of rows on the rows of its last block, -1 on the others
  (a tar shard's count is known only once it has been read to its end). Rows reach the driver out
  of order; the unit is complete when it has received as many rows as any of them announced.

A format's partitioner, `PARTITIONERS[fmt](path, done, unit_size)`, returns the readers of one
ReadTask each, and how many records the units not in DONE hold when it knows without reading them
(None otherwise): a reader is a zero-argument callable yielding `(unit_id, blocks)` for every unit it
owns that is not in DONE. A format without a partitioner (any other format registered in
pipeline.sources.FORMATS) is read whole through `read_source` as the single unit "all", which is
committed when the stream ends: correct, but a resumed run redoes it from the start.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.runtime import map_after_read
from pipeline.sources import Source, check_source, read_datasource, read_source, recut_rows

UNIT_COLUMNS = ("unit", "unit_rows")
WHOLE_SOURCE_UNIT = "all"

UnitBlocks = Iterator[tuple[str, Iterable[pa.Table]]]
UnitReader = Callable[[], UnitBlocks]
Partition = tuple[list[UnitReader], Optional[int]]  # the readers, and the records of their units when known


def shard_unit_id(file: str) -> str:
    """The unit id of an input shard: its file name made file-name safe, and a hash of its absolute
    path that keeps ids unique and unchanged when shards are added to the input."""
    digest = hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(file))[:80]}-{digest}"


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def with_unit(table: pa.Table, unit: str, unit_rows: int) -> pa.Table:
    n = table.num_rows
    return table.append_column("unit", pa.array([unit] * n, pa.string())) \
        .append_column("unit_rows", pa.array([unit_rows] * n, pa.int64()))


def tag_unit_blocks(unit: str, blocks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """BLOCKS tagged with UNIT; the last one also with the unit's row count (one block held back)."""
    held, rows = None, 0
    for block in blocks:
        if block.num_rows == 0:
            continue
        if held is not None:
            yield with_unit(held, unit, -1)
        held, rows = block, rows + block.num_rows
    if held is not None:
        yield with_unit(held, unit, rows)


class WorkUnitDatasource(Datasource):
    """One ReadTask per unit reader, yielding unit-tagged source-row blocks in the reader's order."""

    def __init__(self, readers: list[UnitReader]):
        self.readers = readers

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        def make_task(reader: UnitReader) -> ReadTask:
            def read() -> Iterator[pa.Table]:
                for unit, blocks in reader():
                    yield from tag_unit_blocks(unit, blocks)

            return ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                input_files=None))

        return [make_task(reader) for reader in self.readers]


def _folder_readers(path: str, done: set[str], unit_size: int) -> Partition:
    from pipeline.sources.folder import folder_unit_readers

    return folder_unit_readers(path, done, unit_size)


def _tar_readers(path: str, done: set[str], unit_size: int) -> Partition:
    from pipeline.sources.tar import tar_unit_readers

    return tar_unit_readers(path, done, unit_size)


def _parquet_readers(path: str, done: set[str], unit_size: int) -> Partition:
    from pipeline.sources.parquet import parquet_unit_readers

    return parquet_unit_readers(path, done, unit_size)


# format name -> partitioner(path, done, unit_size) -> (readers, records)
PARTITIONERS: dict[str, Callable[[str, set[str], int], Partition]] = {
    "folder": _folder_readers,
    "tar": _tar_readers,
    "parquet": _parquet_readers,
}


def read_work_units(path: str, fmt: Optional[str], done: set[str], unit_size: int) -> Source:
    """Unit-tagged source rows of every unit of PATH not in DONE, and how many when known without reading."""
    fmt = check_source(path, fmt)
    if fmt not in PARTITIONERS:
        source = read_source(path, fmt=fmt)
        if WHOLE_SOURCE_UNIT in done:
            return Source(source.dataset.limit(0), 0, exact_count=True)
        dataset = map_after_read(source.dataset, lambda block: with_unit(block, WHOLE_SOURCE_UNIT, -1),
                                 batch_format="pyarrow", batch_size=None)
        return Source(dataset, source.num_records, source.recut_rows, source.exact_count)
    readers, records = PARTITIONERS[fmt](path, done, unit_size)
    return Source(read_datasource(WorkUnitDatasource(readers), max(len(readers), 1)),
                  records, recut_rows([None] * len(readers), records))  # a unit holds up to UNIT_SIZE records
