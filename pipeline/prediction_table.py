"""Prediction rows as Arrow tables: the schema of predictions.parquet and the table of one batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.classes import NUM_CLASSES


PREDICTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int64()),
    ("top5_ids", pa.list_(pa.int32(), 5)), ("top5_probs", pa.list_(pa.float32(), 5)),
    ("error", pa.string()),
])
# the whole distribution, when asked for: 4 KB per image
PROBABILITIES_FIELD = pa.field("probs", pa.list_(pa.float32(), NUM_CLASSES))


def fixed_size_lists(rows: np.ndarray, type_: pa.DataType) -> pa.Array:
    """An [N, k] array as N Arrow lists of k values."""
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type_), rows.shape[1])


def prediction_schema(probabilities: bool) -> pa.Schema:
    return PREDICTION_SCHEMA.append(PROBABILITIES_FIELD) if probabilities else PREDICTION_SCHEMA


def prediction_table(batch: dict[str, np.ndarray]) -> pa.Table:
    probabilities = "probs" in batch
    schema = prediction_schema(probabilities)
    if not len(batch["key"]):
        return schema.empty_table()
    return pa.Table.from_arrays([
        pa.array(batch["key"].tolist(), pa.string()),
        pa.array(batch["label"], pa.int64()),
        fixed_size_lists(batch["top_ids"], pa.int32()),
        fixed_size_lists(batch["top_probs"], pa.float32()),
        pa.array([str(e) for e in batch["error"]], pa.string()),
        *([fixed_size_lists(batch["probs"], pa.float32())] if probabilities else []),
    ], schema=schema)
