"""The driver's side of a run: the prediction rows streamed from the inference actors, batch by
batch as they arrive, with the progress reported after each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from ray.data import Dataset

ProgressCallback = Callable[[int, Optional[int]], None]


def stream_batches(predictions: Dataset, on_batch: Callable[[dict[str, np.ndarray]], None], *,
                   on_progress: Optional[ProgressCallback] = None, total: Callable[[], Optional[int]] = lambda: None,
                   done_before: int = 0) -> int:
    """Feed every batch of PREDICTIONS to ON_BATCH, then tell ON_PROGRESS(records done, TOTAL()),
    counting DONE_BEFORE records of an earlier run; return the records this stream held."""
    records = 0
    for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
        on_batch(batch)
        records += len(batch["key"])
        if on_progress:
            on_progress(done_before + records, total())
    return records
