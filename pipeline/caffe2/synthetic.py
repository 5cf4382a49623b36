"""A ResNet-50-shaped Caffe2 int8 predictor with generated (untrained) weights.

Same operators, argument names, NHWC weight layout and blob naming (`gpu_0/...`) as the
quantised ResNet-50 of Caffe2's model zoo, so the importer can be exercised end to end
without the published files. Its predictions mean nothing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.caffe2.netbuilder import int8_fill, int32_fill, make_net, make_op

INPUT_BLOB = "gpu_0/data_0"
OUTPUT_BLOB = "gpu_0/softmax"
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # bottleneck width, blocks, stride
EXPANSION = 4
# Normalised pixels ((x - mean) / std) lie in about [-2.2, 2.7].
INPUT_SCALE, INPUT_ZERO_POINT = 5.0 / 255, 112


class _Builder:
    """Accumulates init/predict ops; tracks the second moment of activations to pick
    output scales that neither saturate nor collapse (He-initialised weights keep it)."""

    def __init__(self, seed: int, engine: str):
        self.rng = np.random.default_rng(seed)
        self.engine = engine
        self.init_ops: list[Any] = []
        self.ops: list[Any] = []
        self.weights: list[str] = []

    def conv(self, name: str, x: str, x_scale: float, x_moment: float, c_in: int, c_out: int, kernel: int,
             stride: int, relu: bool) -> tuple[str, float, float]:
        """Int8Conv(Relu) with Int8GivenTensorFill weights [M, kH, kW, C] and an int32 bias.

        Returns the output blob, its scale and its second moment."""
        fan_in = c_in * kernel * kernel
        std = math.sqrt(2.0 / fan_in)
        w_scale = 4 * std / 127
        w_real = self.rng.standard_normal((c_out, kernel, kernel, c_in), dtype=np.float32) * std
        # Symmetric weights stored as uint8 with zero point 128, as in the model card.
        w_q = np.clip(np.rint(w_real / w_scale) + 128, 1, 255).astype(np.uint8)
        bias = np.rint(self.rng.normal(0, 0.05, c_out) / (x_scale * w_scale)).astype(np.int32)
        w_blob, b_blob = f"gpu_0/{name}_w", f"gpu_0/{name}_b"
        self.init_ops += [int8_fill(w_blob, w_q, w_scale, 128), int32_fill(b_blob, bias, x_scale * w_scale)]
        self.weights += [w_blob, b_blob]
        pre_std = math.sqrt(2 * x_moment)
        if relu:
            y_scale, y_zero_point, y_moment = 4 * pre_std / 255, 0, x_moment
        else:
            y_scale, y_zero_point, y_moment = 8 * pre_std / 255, 128, 2 * x_moment
        y = f"gpu_0/{name}"
        self.ops.append(make_op(
            "Int8ConvRelu" if relu else "Int8Conv", [x, w_blob, b_blob], [y], engine=self.engine,
            order="NHWC", kernel=kernel, stride=stride, pad=kernel // 2,
            Y_scale=y_scale, Y_zero_point=y_zero_point,
        ))
        return y, y_scale, y_moment

    def bottleneck(self, prefix: str, x: str, x_scale: float, x_moment: float, c_in: int, width: int,
                   stride: int) -> tuple[str, float, float]:
        a, a_s, a_m = self.conv(f"{prefix}_branch2a", x, x_scale, x_moment, c_in, width, 1, 1, True)
        b, b_s, b_m = self.conv(f"{prefix}_branch2b", a, a_s, a_m, width, width, 3, stride, True)
        c, _, c_m = self.conv(f"{prefix}_branch2c", b, b_s, b_m, width, width * EXPANSION, 1, 1, False)
        if stride != 1 or c_in != width * EXPANSION:
            shortcut, _, s_m = self.conv(f"{prefix}_branch1", x, x_scale, x_moment, c_in, width * EXPANSION, 1, stride, False)
        else:
            shortcut, s_m = x, x_moment
        sum_moment = c_m + s_m
        y_scale = 4 * math.sqrt(sum_moment) / 255
        y = f"gpu_0/{prefix}_sum"
        self.ops.append(make_op("Int8SumRelu", [c, shortcut], [y], engine=self.engine, Y_scale=y_scale, Y_zero_point=0))
        return y, y_scale, sum_moment / 2


def resnet50_int8_nets(seed: int = 0, engine: str = "", num_classes: int = 1000) -> tuple[Any, Any]:
    """(init_net, predict_net) of an int8 ResNet-50 taking NCHW float `gpu_0/data_0`.

    `engine` "" gives QNNPACK's Int8* operators, "DNNLOWP" the server-side engine forms.
    """
    b = _Builder(seed, engine)
    data_q = "gpu_0/data_0_quantized"
    b.ops.append(make_op("Int8Quantize", [INPUT_BLOB], [data_q], engine=engine,
                         Y_scale=INPUT_SCALE, Y_zero_point=INPUT_ZERO_POINT))
    x, x_scale, x_moment = b.conv("conv1", data_q, INPUT_SCALE, 1.0, 3, 64, 7, 2, True)
    pool = "gpu_0/pool1"
    b.ops.append(make_op("Int8MaxPool", [x], [pool], engine=engine, order="NHWC", kernel=3, stride=2, pad=1,
                         Y_scale=x_scale, Y_zero_point=0))
    x, c_in = pool, 64
    for stage, (width, blocks, stride) in enumerate(STAGES, start=2):
        for block in range(blocks):
            x, x_scale, x_moment = b.bottleneck(f"res{stage}_{block}", x, x_scale, x_moment, c_in, width,
                                                stride if block == 0 else 1)
            c_in = width * EXPANSION
    avg = "gpu_0/pool5"
    b.ops.append(make_op("Int8AveragePool", [x], [avg], engine=engine, order="NHWC", kernel=7, stride=1,
                         Y_scale=x_scale, Y_zero_point=0))
    fc_w = b.rng.standard_normal((num_classes, c_in), dtype=np.float32) * math.sqrt(1.0 / c_in)
    fc_w_scale = 4 * math.sqrt(1.0 / c_in) / 127
    b.init_ops += [
        int8_fill("gpu_0/pred_w", np.clip(np.rint(fc_w / fc_w_scale) + 128, 1, 255).astype(np.uint8), fc_w_scale, 128),
        int32_fill("gpu_0/pred_b", np.zeros(num_classes, np.int32), x_scale * fc_w_scale),
    ]
    b.weights += ["gpu_0/pred_w", "gpu_0/pred_b"]
    logits_scale = 8 * math.sqrt(x_moment) / 255
    b.ops += [
        make_op("Int8FC", [avg, "gpu_0/pred_w", "gpu_0/pred_b"], ["gpu_0/pred"], engine=engine,
                Y_scale=logits_scale, Y_zero_point=128),
        make_op("Int8Dequantize", ["gpu_0/pred"], ["gpu_0/pred_float"], engine=engine),
        make_op("Softmax", ["gpu_0/pred_float"], [OUTPUT_BLOB]),
    ]
    init_net = make_net("resnet50_quantized_init", b.init_ops)
    predict_net = make_net("resnet50_quantized", b.ops, [INPUT_BLOB, *b.weights], [OUTPUT_BLOB])
    return init_net, predict_net
