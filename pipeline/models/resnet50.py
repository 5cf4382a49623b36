"""ResNet-50 v1.5 in torchvision's state dict layout (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`layer1.0.downsample.0/1`, `fc`): stride on the 3x3 convolution of each bottleneck, batch norm
folded into the convolutions. Output softmax probabilities over 1,000 classes.

`generated_weights` gives a seeded random state dict in the same layout, scaled so activations
keep a sensible range through all 16 blocks: for structure, quantisation and speed tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from pipeline.models.graph import INPUT_NAME, GraphBuilder, fold_batch_norm
from pipeline.models.state_dict import StateDict

BN_EPS = 1e-5
LAYERS = [(3, 64), (4, 128), (6, 256), (3, 512)]  # (blocks, bottleneck width) per stage
EXPANSION = 4
FEATURES = LAYERS[-1][1] * EXPANSION  # channels into the classifier


def _bottlenecks() -> Iterator[tuple[str, int, int, int, bool]]:
    """(name prefix, input channels, bottleneck width, stride, has a downsample branch) of every
    bottleneck block, in graph order: the first block of a stage downsamples (stride 2 from stage 2)."""
    in_ch = 64
    for layer, (blocks, width) in enumerate(LAYERS, start=1):
        for block in range(blocks):
            yield f"layer{layer}.{block}", in_ch, width, 2 if block == 0 and layer > 1 else 1, block == 0
            in_ch = width * EXPANSION


def _convolutions() -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """(conv name, batch norm name, weight shape) of every convolution, in graph order."""
    convs = [("conv1", "bn1", (64, 3, 7, 7))]
    for p, in_ch, width, _, downsample in _bottlenecks():
        convs += [
            (f"{p}.conv1", f"{p}.bn1", (width, in_ch, 1, 1)),
            (f"{p}.conv2", f"{p}.bn2", (width, width, 3, 3)),
            (f"{p}.conv3", f"{p}.bn3", (width * EXPANSION, width, 1, 1)),
        ]
        if downsample:
            convs.append((f"{p}.downsample.0", f"{p}.downsample.1", (width * EXPANSION, in_ch, 1, 1)))
    return convs


def build(weights: StateDict, classes: int = 1000, size: int = 224) -> onnx.ModelProto:
    g = GraphBuilder("resnet50")

    def conv_bn(x: str, conv: str, bn: str, out_ch: int, in_ch: int, kernel: int, stride: int) -> str:
        w, b = fold_batch_norm(weights.tensor(f"{conv}.weight", (out_ch, in_ch, kernel, kernel)),
                               weights.batch_norm(bn, out_ch), BN_EPS)
        pad = kernel // 2
        return g.conv(x, conv, w, b, stride, (pad, pad, pad, pad))

    x = g.relu(conv_bn(INPUT_NAME, "conv1", "bn1", 64, 3, 7, 2), "relu")
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for p, in_ch, width, stride, downsample in _bottlenecks():
        h = g.relu(conv_bn(x, f"{p}.conv1", f"{p}.bn1", width, in_ch, 1, 1), f"{p}.relu1")
        h = g.relu(conv_bn(h, f"{p}.conv2", f"{p}.bn2", width, width, 3, stride), f"{p}.relu2")
        h = conv_bn(h, f"{p}.conv3", f"{p}.bn3", width * EXPANSION, width, 1, 1)
        shortcut = x
        if downsample:
            shortcut = conv_bn(x, f"{p}.downsample.0", f"{p}.downsample.1", width * EXPANSION, in_ch, 1, stride)
        x = g.relu(g.add(h, shortcut, f"{p}.add"), f"{p}.relu3")
    out = g.classifier_head(x, weights.tensor("fc.weight", (classes, FEATURES)),
                            weights.tensor("fc.bias", (classes,)))
    weights.check_all_used()
    return g.model(out, classes, size)


def generated_weights(seed: int = 0, classes: int = 1000) -> dict[str, np.ndarray]:
    """Seeded random weights: He-initialised convolutions; the last batch norm of each residual
    branch scaled down so the residual sum grows slowly; running statistics of a unit-variance
    input, so folded biases stay small."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for conv, bn, shape in _convolutions():
        fan_in = int(np.prod(shape[1:]))
        tensors[f"{conv}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        out_ch = shape[0]
        gamma = 0.2 if conv.endswith("conv3") else 1.0
        tensors[f"{bn}.weight"] = np.full(out_ch, gamma, np.float32) * rng.uniform(0.8, 1.2, out_ch).astype(np.float32)
        tensors[f"{bn}.bias"] = rng.normal(0.0, 0.1, out_ch).astype(np.float32)
        tensors[f"{bn}.running_mean"] = rng.normal(0.0, 0.1, out_ch).astype(np.float32)
        tensors[f"{bn}.running_var"] = rng.uniform(0.5, 1.5, out_ch).astype(np.float32)
    tensors["fc.weight"] = (rng.standard_normal((classes, FEATURES)) * np.sqrt(1.0 / FEATURES)).astype(np.float32)
    tensors["fc.bias"] = np.zeros(classes, np.float32)
    return tensors
