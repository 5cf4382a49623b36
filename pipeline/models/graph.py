"""A small helper for writing inference graphs with the `onnx` package: named nodes, weights
as initializers, batch norm folded into the preceding convolution."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


def fold_batch_norm(
    weight: np.ndarray, bn: dict[str, np.ndarray], eps: float, bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight [O, ...] and bias with an inference-mode batch norm folded in."""
    scale = bn["weight"] / np.sqrt(bn["running_var"] + eps)
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_bias = (bias if bias is not None else 0.0) * scale + bn["bias"] - bn["running_mean"] * scale
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


class GraphBuilder:
    """Collects nodes and initializers; every method returns the name of its output tensor."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(
        self, x: str, name: str, weight: np.ndarray, bias: np.ndarray, stride: int,
        pads: tuple[int, int, int, int], group: int = 1,
    ) -> str:
        """pads are (top, left, bottom, right), ONNX order."""
        w = self.constant(f"{name}.weight", weight)
        b = self.constant(f"{name}.bias", bias)
        return self.node(
            "Conv", [x, w, b], name, kernel_shape=list(weight.shape[2:]), strides=[stride, stride],
            pads=list(pads), group=group,
        )

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        low = self.constant(f"{name}.min", np.array(0.0, np.float32))
        high = self.constant(f"{name}.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, low, high], name)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def classifier_head(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str = "fc") -> str:
        """Global average pool, fully connected layer, softmax into the graph output."""
        pooled = self.node("GlobalAveragePool", [x], "avgpool")
        flat = self.node("Flatten", [pooled], "flatten", axis=1)
        w = self.constant(f"{name}.weight", weight.astype(np.float32))
        b = self.constant(f"{name}.bias", bias.astype(np.float32))
        logits = self.node("Gemm", [flat, w, b], name, transB=1)
        return self.node("Softmax", [logits], OUTPUT_NAME, axis=1)

    def model(self, output: str, classes: int, size: int = 224) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="int8-imagenet-pipeline")
        onnx.checker.check_model(model)
        return model
