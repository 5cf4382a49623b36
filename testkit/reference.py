"""The plain single-process loop: read, decode, preprocess and run one onnxruntime session in turn.

It is what the pipeline is checked against (same preprocessing functions, no Ray) and the "naive"
line of the benchmark."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.config import Preset
from pipeline.onnx_model import ModelInfo, make_session, run_model, top_k
from pipeline.preprocess import Normalizer, decode_image, resize_and_crop
from pipeline.sources.folder import list_folder_records


def reference_predictions(model: str, folder: str | Path, preset: Preset, *, labels: Optional[str] = None,
                          limit: Optional[int] = None, batch_size: int = 32,
                          threads: int = 1) -> Iterator[tuple[str, int, np.ndarray]]:
    """(key, label, top-5 ids) for each decodable image of FOLDER, in key order."""
    info = ModelInfo.from_path(model)
    session = make_session(model, threads=threads)
    normalize = Normalizer(preset)
    records = list_folder_records(folder, labels)[:limit]
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        crops = [resize_and_crop(decode_image((Path(folder) / key).read_bytes()), preset) for key, _ in chunk]
        ids, _ = top_k(run_model(session, info, normalize(np.stack(crops))), 5)
        for (key, label), row in zip(chunk, ids):
            yield key, label, row
