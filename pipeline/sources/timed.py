"""Every format's reads, timed the same way without the formats knowing (`pipeline.timing`)."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
from ray.data.datasource import Datasource, ReadTask

from pipeline.timing import READ, with_read_time


class TimedReads(Datasource):
    """A Datasource whose read tasks are DATASOURCE's, each block carrying the CPU time its read took."""

    def __init__(self, datasource: Datasource):
        self.datasource = datasource

    def get_name(self) -> str:
        return self.datasource.get_name()

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return self.datasource.estimate_inmemory_data_size()

    def get_read_tasks(self, parallelism: int, **options) -> list[ReadTask]:
        return [self._timed(task) for task in self.datasource.get_read_tasks(parallelism, **options)]

    @staticmethod
    def _timed(task: ReadTask) -> ReadTask:
        schema = task.schema.append(pa.field(READ, pa.float64())) if isinstance(task.schema, pa.Schema) else None
        return ReadTask(with_read_time(task.read_fn), task.metadata, schema=schema,
                        per_task_row_limit=task.per_task_row_limit)
