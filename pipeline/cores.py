"""CPU topology and pinning: each inference actor takes one physical core of its node to itself."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Optional


def parse_cpu_list(text: str) -> list[int]:
    """Linux CPU list syntax ("0-3,8,10-11") -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def thread_siblings(cpu: int) -> list[int]:
    """The logical CPUs that share CPU's physical core (itself included)."""
    try:
        return parse_cpu_list(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text())
    except OSError:
        return [cpu]


def physical_cores_first(cpus, siblings: dict[int, list[int]]) -> list[int]:
    """CPUS ordered so that the first hyperthread of every physical core comes before any second
    one: actors pinned in this order each get a physical core of their own (on a c7i node, one
    actor per core, not two actors on the two threads of one core)."""
    def thread_index(cpu: int) -> int:
        threads = sorted(siblings.get(cpu, [cpu]))
        return threads.index(cpu) if cpu in threads else 0

    return sorted(cpus, key=lambda cpu: (thread_index(cpu), cpu))


class CorePin:
    """Pins this process to one core of its node that no other actor of the same run holds.

    Each core is claimed with an exclusive lock on a file in the node's temp folder; the kernel
    releases the lock when the process dies, so a restarted actor can claim the core again."""

    def __init__(self, run_id: str):
        self.core: Optional[int] = None
        self._lock_file = None
        folder = Path(tempfile.gettempdir()) / "int8-pipeline-cores" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        cpus = os.sched_getaffinity(0)
        for core in physical_cores_first(cpus, {cpu: thread_siblings(cpu) for cpu in cpus}):
            handle = open(folder / f"core{core}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.sched_setaffinity(0, {core})
            self.core, self._lock_file = core, handle
            break
