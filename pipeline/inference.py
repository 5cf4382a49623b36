"""The inference actor: one onnxruntime session per Ray actor, one intra-op thread, pinned to its own core."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from pipeline.classes import NUM_CLASSES
from pipeline.config import Preset
from pipeline.cores import CorePin
from pipeline.onnx_model import ModelInfo, make_session, run_model, top_k
from pipeline.preprocess import Normalizer
from pipeline.timing import DECODE, INFERENCE, NODE_BUSY, NORMALIZE, READ, node_busy_seconds, spread


# the error row of an image whose class scores came out NaN or infinite: ranked, they would be
# reported as arbitrary classes and counted as a wrong prediction
NON_FINITE_OUTPUT = "the model's output for this image is not finite (NaN or infinity)"


class Classifier:
    """Ray actor: preprocessed rows (`pipeline.preprocess.Preprocessor`) -> `key, label, top_ids,
    top_probs, error` (+ where it ran, and with PROBABILITIES the whole distribution over the classes
    as `probs`). The uint8 crops are normalised here, by PRESET, into the model's float input.

    Rows that arrive with an error are passed through with ids -1 and probabilities 0; columns named
    in CARRY are copied through unchanged."""

    def __init__(self, info: ModelInfo, preset: Preset, top_k: int = 5, run_id: str = "default",
                 carry: tuple[str, ...] = (), probabilities: bool = False, pin: Optional[CorePin] = None):
        # PIN: the core of an actor that holds several classifiers (pipeline.compare.ModelSet)
        self.pin = pin or CorePin(run_id)
        # INFO was read on the driver: the actor does not import onnx (a second of CPU) to read it again
        self.info = info
        self.session = make_session(info.path, threads=1)
        self.normalize = Normalizer(preset)
        self.k = top_k
        self.carry = carry
        self.probabilities = probabilities
        self.node = _ray_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"]
        ok = errors == ""
        n = len(errors)
        started = time.thread_time()
        inputs = self.normalize(batch["crop"] if ok.all() else batch["crop"][ok])  # all: no copy of the batch
        normalized = time.thread_time()
        if ok.all():
            class_probs = run_model(self.session, self.info, inputs)
        else:
            class_probs = np.zeros((n, NUM_CLASSES), dtype=np.float32)
            if ok.any():
                class_probs[ok] = run_model(self.session, self.info, inputs)
        inferred = time.thread_time()
        # checked on the probabilities, not the raw outputs: a logit of -inf is a probability of 0,
        # while NaN or +inf in the outputs makes its row's probabilities NaN or infinite
        not_finite = ok & ~np.isfinite(class_probs).all(axis=1)
        if not_finite.any():
            errors = errors.astype(object)  # a copy, and one that takes a longer string than it holds
            errors[not_finite] = NON_FINITE_OUTPUT
            class_probs[not_finite] = 0.0  # as for every error row
            ok &= ~not_finite
        ids, probs = top_k(class_probs, self.k)
        ids[~ok] = -1
        return {
            "key": batch["key"], "label": batch["label"], "top_ids": ids, "top_probs": probs,
            "error": errors, "node": np.full(n, self.node, dtype=object),
            "core": np.full(n, -1 if self.pin.core is None else self.pin.core, dtype=np.int32),
            NORMALIZE: spread(normalized - started, n), INFERENCE: spread(inferred - normalized, n),
            NODE_BUSY: np.full(n, node_busy_seconds()),
            **{column: batch[column] for column in (READ, DECODE) if column in batch},
            **({"probs": class_probs} if self.probabilities else {}),
            **{column: batch[column] for column in self.carry},
        }


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
