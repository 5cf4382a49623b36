"""An ONNX classifier: what the pipeline reads of the model file, its onnxruntime session, and its
outputs turned into class probabilities and the top classes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.classes import NUM_CLASSES
from pipeline.errors import UserError


class ModelError(UserError):
    """A model file the pipeline cannot run; the message is one sentence saying why."""



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
