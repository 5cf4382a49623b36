"""Inference: one onnxruntime session per Ray actor, one intra-op thread, pinned to its own core."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.classes import NUM_CLASSES
from pipeline.config import Preset
from pipeline.errors import UserError
from pipeline.preprocess import Normalizer
from pipeline.timing import DECODE, INFERENCE, NODE_BUSY, NORMALIZE, READ, node_busy_seconds, spread


class ModelError(UserError):
    """A model file the pipeline cannot run; the message is one sentence saying why."""


# the error row of an image whose class scores came out NaN or infinite: ranked, they would be
# reported as arbitrary classes and counted as a wrong prediction
NON_FINITE_OUTPUT = "the model's output for this image is not finite (NaN or infinity)"


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a classifier, read from the model file itself."""

    path: str
    input_name: str
    height: int
    width: int
    batch_size: Optional[int]  # fixed batch dimension, or None when dynamic
    num_outputs: int  # 1000, or 1001 when class 0 is "background"
    outputs_probabilities: bool  # the graph ends in Softmax: do not apply it again

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "ModelInfo":
        import onnx

        path = str(path)
        if not Path(path).is_file():
            raise ModelError(f"{path}: model file not found.")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception:
            raise ModelError(f"{path}: not an ONNX model (the file does not parse as ONNX protobuf).") from None
        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) < 1:
            raise ModelError(f"{path}: expected one image input and a class output, found "
                             f"{len(inputs)} inputs and {len(graph.output)} outputs.")
        elem_type = inputs[0].type.tensor_type.elem_type
        if elem_type != onnx.TensorProto.FLOAT:
            raise ModelError(f"{path}: input {inputs[0].name!r} takes {onnx.TensorProto.DataType.Name(elem_type)}, "
                             "expected FLOAT (the preprocessed float32 image)")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] != 3 or not dims[2] or not dims[3]:
            shown = ["?" if d is None else d for d in dims]
            raise ModelError(f"{path}: input {inputs[0].name!r} has shape {shown}, "
                             f"expected [N, 3, H, W] with fixed H and W.")
        out_dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in graph.output[0].type.tensor_type.shape.dim]
        num_outputs = out_dims[-1] if len(out_dims) == 2 else None  # [N, classes]: one score per class
        if num_outputs not in (NUM_CLASSES, NUM_CLASSES + 1):
            raise ModelError(f"{path}: output {graph.output[0].name!r} has shape {out_dims}, "
                             f"expected [N, 1000] or [N, 1001] class scores.")
        producer = {out: node for node in graph.node for out in node.output}
        last = producer.get(graph.output[0].name)
        # a Flatten/Reshape after Softmax still yields probabilities
        while last is not None and last.op_type in ("Flatten", "Reshape", "Squeeze", "Identity"):
            last = producer.get(last.input[0])
        return cls(
            path=path, input_name=inputs[0].name, height=dims[2], width=dims[3],
            batch_size=dims[0] or None, num_outputs=num_outputs,
            outputs_probabilities=last is not None and last.op_type == "Softmax",
        )


def checked_model_info(path: str | os.PathLike) -> ModelInfo:
    """`ModelInfo.from_path`, once onnxruntime has also loaded the model on the driver: an operator it
    does not know, or a graph it rejects, is then one sentence before Ray starts, not the failure of
    every inference actor."""
    info = ModelInfo.from_path(path)
    try:
        make_session(info.path)
    except Exception as exc:  # onnxruntime raises its own pybind11 exception types
        raise ModelError(f"{path}: onnxruntime cannot load it: {' '.join(str(exc).split())}") from None
    return info


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def class_probabilities(outputs: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Model outputs -> [N, 1000] float probabilities (background class dropped, softmax in float).

    With 1001 outputs the softmax is taken over the 1000 ImageNet classes, so that the reported
    probabilities sum to 1 over the classes the labels can name."""
    outputs = outputs.reshape(outputs.shape[0], -1).astype(np.float32)
    if info.num_outputs == NUM_CLASSES + 1:
        if info.outputs_probabilities:
            probs = outputs[:, 1:]
            return probs / np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        outputs = outputs[:, 1:]
    return outputs if info.outputs_probabilities else softmax(outputs)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids [N, k] (best first) and their probabilities. Tied classes come lowest id first, as
    with argmax: an int8 model's quantised logits tie often enough (a dozen of 1,300 images) that an
    arbitrary order would move top-1 by several images from one ordering to the next."""
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(probs, ids, axis=1).astype(np.float32)


def make_session(model_path: str, threads: int = 1):
    """An onnxruntime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # the session must not spin threads on cores it was not given
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads == 1 else "1")
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def checked_outputs(outputs: np.ndarray, info: ModelInfo, images: int) -> np.ndarray:
    """OUTPUTS of one model call on IMAGES images, once they are the [IMAGES, classes] its output
    declares: onnxruntime only warns when a model returns another shape, and scores of the wrong
    shape would be ranked as class ids that do not exist."""
    if outputs.shape != (images, info.num_outputs):
        raise ModelError(f"{info.path}: the model returned scores of shape {list(outputs.shape)} for {images} "
                         f"images, not the [{images}, {info.num_outputs}] its output declares")
    return outputs


def run_model(session, info: ModelInfo, inputs: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] float32 -> [N, 1000] probabilities; a fixed-batch model is fed padded chunks."""
    if info.batch_size is None:
        return class_probabilities(checked_outputs(session.run(None, {info.input_name: inputs})[0], info,
                                                   len(inputs)), info)
    size = info.batch_size
    chunks = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start:start + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)]) \
            if len(chunk) < size else chunk
        chunks.append(checked_outputs(session.run(None, {info.input_name: padded})[0], info, size)[:len(chunk)])
    return class_probabilities(np.concatenate(chunks), info)


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
