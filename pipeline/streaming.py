"""The driver's side of a run: the prediction rows streamed from the inference actors, batch by
batch as they arrive, with the progress reported after each.

A Ctrl-C reaches the loop however Python delivers it. Python raises KeyboardInterrupt wherever the
main thread is when SIGINT arrives; inside a finalizer (an object's `__del__`, a weakref callback:
Ray and Ray Data run many while a dataset streams) it prints "Exception ignored in ..." and drops
the exception, and the run went on to its end as if no Ctrl-C had come. So the loop's SIGINT handler
also records the Ctrl-C, and the loop raises it again at its next batch, and once more at its end."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from ray.data import Dataset

ProgressCallback = Callable[[int, Optional[int]], None]

_interrupted = threading.Event()


def _record_interrupt(signum: int, frame: object) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _quiet_dropped_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: a KeyboardInterrupt that a finalizer dropped is raised again by the loop,
    not printed as Python's "Exception ignored" traceback."""
    if not (unraisable.exc_type and issubclass(unraisable.exc_type, KeyboardInterrupt) and _interrupted.is_set()):
        sys.__unraisablehook__(unraisable)


def catch_interrupts() -> None:
    """Record every Ctrl-C from now on (signals are handled in the main thread only)."""
    _interrupted.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _record_interrupt)
        sys.unraisablehook = _quiet_dropped_interrupt


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when a Ctrl-C came that Python dropped before it reached the loop."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def stream_batches(predictions: Dataset, on_batch: Callable[[dict[str, np.ndarray]], None], *,
                   on_progress: Optional[ProgressCallback] = None, total: Callable[[], Optional[int]] = lambda: None,
                   done_before: int = 0) -> int:
    """Feed every batch of PREDICTIONS to ON_BATCH, then tell ON_PROGRESS(records done, TOTAL()),
    counting DONE_BEFORE records of an earlier run; return the records this stream held."""
    catch_interrupts()
    records = 0
    for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
        raise_if_interrupted()
        on_batch(batch)
        records += len(batch["key"])
        if on_progress:
            on_progress(done_before + records, total())
    raise_if_interrupted()
    return records
