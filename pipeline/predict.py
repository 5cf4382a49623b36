"""The prediction chain every run reads: a source's rows -> preprocessing map tasks -> inference
actors -> prediction rows (evaluate, compare's baseline parity, label, and quantize's evaluations)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Optional

import ray.data

from pipeline.config import Preset
from pipeline.inference import Classifier
from pipeline.onnx_model import ModelInfo
from pipeline.preprocess import Preprocessor
from pipeline.runtime import inference_actor_options, inference_slots, map_after_read
from pipeline.sources import Source


def predict(source: Source, info: ModelInfo, preset: Preset, *, require_label: bool, top_k: int,
            batch_size: int, run_id: Optional[str] = None, carry: tuple[str, ...] = (), probabilities: bool = False):
    """The Ray Dataset of prediction rows (`key, label, top_ids, top_probs, error, node, core`, the
    source columns named in CARRY, and with PROBABILITIES the class distribution `probs`)."""
    actors = inference_slots()
    preprocessed = map_after_read(source.dataset, Preprocessor(preset, require_label=require_label, carry=carry),
                                  source.recut_rows, batch_size=None, batch_format="numpy")
    return preprocessed.map_batches(
        Classifier,
        fn_constructor_kwargs={"info": dataclasses.replace(info, path=os.path.abspath(info.path)), "preset": preset,
                               "top_k": top_k,
                               "run_id": run_id or uuid.uuid4().hex, "carry": carry,
                               "probabilities": probabilities},
        batch_size=info.batch_size or batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **inference_actor_options(),
    )
