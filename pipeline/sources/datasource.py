"""The one Ray Datasource of every format: the ReadTasks of a `Plan`, each read timed.

A format plans its pieces (`pipeline.sources.base.Plan`); this module turns them into ReadTasks,
one per piece or per share of the pieces (`Plan.read_tasks`), whose blocks carry the CPU time each
read took (`pipeline.timing`) without the formats knowing. `pipeline label` tags the blocks with
their work unit on top of the same pieces (`pipeline.sources.units`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.sources.base import Piece, Plan
from pipeline.timing import READ, with_read_time

# what a ReadTask does with the blocks of each of its pieces (`pipeline.sources.units`), if anything
BlockTagger = Callable[[Piece, Iterable[pa.Table]], Iterator[pa.Table]]


class PieceDatasource(Datasource):
    """A ReadTask per piece of PLAN (or per share, `Plan.read_tasks`), the blocks of each piece passed
    through TAG when given."""

    def __init__(self, plan: Plan, tag: Optional[BlockTagger] = None):
        self.plan = plan
        self.tag = tag

    def get_name(self) -> str:
        return self.plan.name

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return self.plan.size_bytes

    def task_pieces(self) -> list[list[Piece]]:
        """The pieces of each ReadTask."""
        pieces, tasks = self.plan.pieces, self.plan.read_tasks
        return [pieces[task::tasks] for task in range(tasks)] if tasks else [[piece] for piece in pieces]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        plan = self.plan
        # a tagger adds columns of its own: the blocks' schema is then left for Ray Data to see
        schema = None
        if plan.schema is not None and self.tag is None:
            schema = plan.schema.append(pa.field(READ, pa.float64()))
        size = plan.size_bytes // max(len(plan.pieces), 1) if plan.size_bytes is not None else None
        return [ReadTask(with_read_time(self.reader(pieces)), self.metadata(pieces, size), schema=schema,
                         per_task_row_limit=per_task_row_limit)
                for pieces in self.task_pieces()]

    def reader(self, pieces: list[Piece]) -> Callable[[], Iterator[pa.Table]]:
        tag = self.tag

        def read() -> Iterator[pa.Table]:
            for piece in pieces:
                yield from tag(piece, piece.read()) if tag else piece.read()

        return read

    @staticmethod
    def metadata(pieces: list[Piece], size_bytes: Optional[int]) -> BlockMetadata:
        rows = [piece.rows for piece in pieces]
        files = [file for piece in pieces for file in piece.files or ()]
        return BlockMetadata(num_rows=None if not rows or None in rows else sum(rows), size_bytes=size_bytes,
                             exec_stats=None, input_files=files or None)


def read_plan(plan: Plan, tag: Optional[BlockTagger] = None) -> ray.data.Dataset:
    """The Ray Dataset of PLAN's rows: one block per ReadTask planned, since Ray would otherwise split
    blocks to reach its default parallelism, and a split read is not fused with the preprocessing."""
    datasource = PieceDatasource(plan, tag)
    return ray.data.read_datasource(datasource, override_num_blocks=max(1, len(datasource.task_pieces())))
