"""Where a run's time goes: CPU seconds per image for each stage, measured where the stage runs.

Each stage times itself on the thread that does the work (`time.thread_time`: CPU, not waiting)
and writes its share into a column of every row it produces, so the figures travel with the rows
and the driver only adds them up (`TimeBreakdown`). The stages are the read, decoding + resizing
(+ cropping), normalising, and inference. What the nodes' CPUs spent beyond them is "the rest":
Ray's own processes and threads, the driver, serialising and moving blocks between processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import numpy as np
import pyarrow as pa

READ = "read_cpu_s"
DECODE = "decode_cpu_s"
NORMALIZE = "normalize_cpu_s"
INFERENCE = "inference_cpu_s"
STAGE_COLUMNS = (READ, DECODE, NORMALIZE, INFERENCE)
# the node's busy CPU seconds (all its processes) when an inference batch finished, and on which node
NODE_BUSY = "node_busy_cpu_s"


def node_busy_seconds() -> float:
    """CPU seconds this machine has spent busy (not idle, not waiting for I/O) since boot, all CPUs."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def _clock_ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


_CLOCK_TICKS = _clock_ticks()


def process_age_seconds() -> float:
    """Seconds since this process started (the command's start, for the CLI), from /proc."""
    with open("/proc/self/stat") as stat:
        started_ticks = int(stat.read().rpartition(")")[2].split()[19])  # field 22, after the command name
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - started_ticks / _CLOCK_TICKS


def with_read_time(read_fn: Callable[[], Iterable[pa.Table]]) -> Callable[[], Iterator[pa.Table]]:
    """READ_FN (a ReadTask's) whose blocks carry the CPU time spent reading each, spread over its rows."""
    def timed() -> Iterator[pa.Table]:
        blocks = iter(read_fn())
        while True:
            started = time.thread_time()
            block = next(blocks, None)
            if block is None:
                return
            rows = block.num_rows
            yield block.append_column(READ, pa.array(np.full(rows, (time.thread_time() - started) / max(rows, 1))))
    return timed


def spread(seconds: float, rows: int) -> np.ndarray:
    """SECONDS of a batch's work as a per-row column."""
    return np.full(rows, seconds / max(rows, 1))


class TimeBreakdown:
    """The driver's sums of the stage columns over a run, and each node's busy CPU over it."""

    def __init__(self) -> None:
        self.stage_seconds = dict.fromkeys(STAGE_COLUMNS, 0.0)
        self.node_busy: dict[str, list[float]] = {}  # node -> [first, last] NODE_BUSY reading
        self.local_node: Optional[str] = None
        self.local_start = self.local_end = 0.0

    def start(self, local_node: str) -> None:
        """At the start of the Ray Data execution, on the driver's node."""
        self.local_node, self.local_start = local_node, node_busy_seconds()

    def update(self, batch: dict[str, np.ndarray]) -> None:
        for column in STAGE_COLUMNS:
            if column in batch:
                self.stage_seconds[column] += float(batch[column].sum())
        if NODE_BUSY in batch and len(batch[NODE_BUSY]):
            for node, reading in zip(batch["node"], batch[NODE_BUSY]):
                first_last = self.node_busy.setdefault(node, [reading, reading])
                first_last[0], first_last[1] = min(first_last[0], reading), max(first_last[1], reading)

    def finish(self) -> None:
        self.local_end = node_busy_seconds()

    def summary(self, images: int, startup: dict[str, float]) -> dict:
        """CPU seconds per image for each stage and for the rest, and the start-up times.

        The busy CPU of the driver's node is read by the driver at the start and the end of the run;
        another node's, by its inference actors, from their first to their last batch (so it misses
        that node's start)."""
        busy = self.local_end - self.local_start
        busy += sum(last - first for node, (first, last) in self.node_busy.items() if node != self.local_node)
        stages = {column.removesuffix("_cpu_s"): seconds for column, seconds in self.stage_seconds.items()}
        per_image = {stage: seconds / images if images else 0.0 for stage, seconds in stages.items()}
        rest = max(busy - sum(stages.values()), 0.0)
        per_image["rest"] = rest / images if images else 0.0
        return {
            "cpu_s_per_image": {stage: round(seconds, 6) for stage, seconds in per_image.items()},
            "cpu_s": {**{stage: round(seconds, 3) for stage, seconds in stages.items()},
                      "rest": round(rest, 3), "nodes_busy": round(busy, 3)},
            **{name: round(seconds, 3) for name, seconds in startup.items()},
        }
