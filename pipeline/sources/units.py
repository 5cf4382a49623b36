"""Work units: an input split into pieces that are read, labelled and committed one by one, so that
a resumed `pipeline label` run skips the pieces already done.

A unit is a piece of a format's plan cut for labelling (`Cut` with unit rows): its id is stable
(file-name safe, the same on every run over the same input). Unit-tagged blocks are source-row
blocks (the contract in `pipeline.sources.base`) with two more columns:

- ``unit``       string: the id of the unit the row belongs to.
- ``unit_rows``  int64: the unit's number of rows on the rows of its last block, -1 on the others
  (a tar shard's count is known only once it has been read to its end). Rows reach the driver out
  of order; the unit is complete when it has received as many rows as any of them announced.

A format whose pieces are not units (LMDB: its key ranges depend on the cluster) is read whole as
the single unit "all", which is committed when the stream ends: correct, but a resumed run redoes it
from the start.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa

from pipeline.sources.base import Piece

UNIT_COLUMNS = ("unit", "unit_rows")
WHOLE_SOURCE_UNIT = "all"


def with_unit(table: pa.Table, unit: str, unit_rows: int) -> pa.Table:
    n = table.num_rows
    return table.append_column("unit", pa.array([unit] * n, pa.string())) \
        .append_column("unit_rows", pa.array([unit_rows] * n, pa.int64()))


def tag_unit_blocks(piece: Piece, blocks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """BLOCKS of unit PIECE tagged with its id; the last one also with the unit's row count (one block
    held back)."""
    held, rows = None, 0
    for block in blocks:
        if block.num_rows == 0:
            continue
        if held is not None:
            yield with_unit(held, piece.id, -1)
        held, rows = block, rows + block.num_rows
    if held is not None:
        yield with_unit(held, piece.id, rows)


def tag_whole_source(piece: Piece, blocks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """BLOCKS tagged with the one unit of a source read whole, whose count is known only at the end."""
    for block in blocks:
        yield with_unit(block, WHOLE_SOURCE_UNIT, -1)
