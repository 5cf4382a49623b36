"""A ResNet-50-shaped Caffe2 int8 predictor with generated (untrained) weights.

Same operators, argument names, NHWC weight layout and blob naming (`gpu_0/...`) as the
quantised ResNet-50 of Caffe2's model zoo, so the importer can be exercised end to end
without the published files. Its predictions mean nothing.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.caffe2.importer import convert_nets, int8_trace_name, read_constants
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
            shortcut, _, s_m = self.conv(f"{prefix}_branch1", x, x_scale, x_moment, c_in, width * EXPANSION, 1, stride,
                                         False)
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


# -- init nets that fit the Caffe2 model zoo's published predict nets -------------------
#
# The zoo's init nets (the trained weights) are not available here. These functions write
# init nets with the names, types and NHWC shapes the real ones have, inferred from each
# predict net's operators and the standard architecture, with random weights whose scales
# keep every activation inside the fixed Y_scale ranges of the real graph.

RESNET50_WIDTHS = {2: 64, 3: 128, 4: 256, 5: 512}  # bottleneck width per stage
# MobileNetV2 1.0: the output channels of each block's 1x1 projection, block by block
# (t, c, n, s = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1)).
MOBILENET_V2_PROJECTIONS = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
MOBILENET_V2_STEM, MOBILENET_V2_LAST = 32, 1280
CONV_TYPES = ("Int8Conv", "Int8ConvRelu", "Conv", "ConvRelu")
WEIGHT_STEPS = 30.0  # std of the integer weights around their zero point (full uint8 range reached)
LOGIT_STEPS = 15.0  # std of the logits in steps of the FC's Y_scale


def _arg(op: Any, name: str, default: Any = None) -> Any:
    for arg in op.arg:
        if arg.name == name:
            return arg.i if arg.HasField("i") else arg.f if arg.HasField("f") else arg.s.decode()
    return default


def _dense_convs(predict_net: Any) -> list[Any]:
    return [op for op in predict_net.op if op.type in CONV_TYPES and int(_arg(op, "group", 1)) == 1]


def resnet50_channels(predict_net: Any) -> dict[str, int]:
    """Weight blob -> output channels of the zoo's ResNet-50 convolutions, from the blob names."""
    channels = {}
    for op in _dense_convs(predict_net):
        name = op.input[1]
        match = re.search(r"res(\d)_\d+_branch(1|2a|2b|2c)_w", name)
        if "conv1_w" in name:
            channels[name] = 64
        elif match is None:
            raise ValueError(f"{name}: not a ResNet-50 v1 weight name")
        else:
            width = RESNET50_WIDTHS[int(match.group(1))]
            channels[name] = width if match.group(2) in ("2a", "2b") else width * EXPANSION
    return channels


def mobilenet_v2_channels(predict_net: Any) -> dict[str, int]:
    """Weight blob -> output channels of the zoo's MobileNetV2 dense convolutions (its blobs are
    numbered): the stem, then per block an expansion (sized by the depthwise convolution it
    feeds) and a projection, then the last 1x1."""
    groups = {op.input[0]: int(_arg(op, "group", 1)) for op in predict_net.op if op.type in CONV_TYPES}
    stem, *rest = _dense_convs(predict_net)
    projections = iter([*MOBILENET_V2_PROJECTIONS, MOBILENET_V2_LAST])
    channels = {stem.input[1]: MOBILENET_V2_STEM}
    for op in rest:
        # An expansion feeds, through its Int8Relu, a depthwise convolution.
        feeds = [groups.get(name, 1) for name in (op.output[0], _relu_output(predict_net, op.output[0]))]
        channels[op.input[1]] = max(feeds) if max(feeds) > 1 else next(projections)
    return channels


def _relu_output(predict_net: Any, blob: str) -> str:
    return next((op.output[0] for op in predict_net.op if op.type == "Int8Relu" and op.input[0] == blob), "")


def zoo_init_net(predict_net: Any, architecture: str, seed: int = 0, num_classes: int = 1000) -> Any:
    """An init net for the zoo's `resnet50` (DNNLOWP: symmetric weights, zero point 128) or
    `mobilenet_v2` (QNNPACK: per-tensor zero points around 128) predict net."""
    rng = np.random.default_rng(seed)
    out_channels = {"resnet50": resnet50_channels, "mobilenet_v2": mobilenet_v2_channels}[architecture](predict_net)
    # Per blob: (channels, scale, zero point, second moment of the real values).
    blobs: dict[str, tuple[int, float, int, float]] = {}
    fills: list[Any] = []

    def fit_weights(op: Any, fan_in: int, m: int, shape: tuple[int, ...], steps: float) -> None:
        """Fill weight and bias so that the output's std is `steps` steps of its Y_scale."""
        _, x_scale, _, x_moment = blobs[op.input[0]]
        y_scale, y_zp = float(_arg(op, "Y_scale")), int(_arg(op, "Y_zero_point", 0))
        target_std = steps * y_scale
        w_zp = 128 if architecture == "resnet50" else int(rng.integers(100, 160))
        w_q = np.clip(np.rint(rng.standard_normal(shape) * WEIGHT_STEPS) + w_zp, 0 if w_zp != 128 else 1, 255)
        w_scale = target_std / (WEIGHT_STEPS * math.sqrt(fan_in * x_moment))
        bias = np.rint(rng.normal(0, 0.2 * target_std, m) / (x_scale * w_scale)).astype(np.int32)
        fills.extend([int8_fill(op.input[1], w_q.astype(np.uint8), w_scale, w_zp),
                      int32_fill(op.input[2], bias, x_scale * w_scale)])
        relu = op.type.endswith("Relu") or y_zp == 0
        blobs[op.output[0]] = (m, y_scale, y_zp, target_std**2 / (2 if relu else 1))

    for op in predict_net.op:
        if op.type == "Int8Quantize":
            blobs[op.output[0]] = (3, float(_arg(op, "Y_scale")), int(_arg(op, "Y_zero_point", 0)), 1.0)
        elif op.type in CONV_TYPES:
            c_in = blobs[op.input[0]][0]
            kernel, group = int(_arg(op, "kernel", 1)), int(_arg(op, "group", 1))
            m = c_in if group > 1 else out_channels[op.input[1]]
            # Outputs that a ReLU follows (zero point near 0) can use twice the steps.
            steps = 60.0 if int(_arg(op, "Y_zero_point", 0)) < 64 else 30.0
            fit_weights(op, kernel * kernel * c_in // group, m, (m, kernel, kernel, c_in // group), steps)
        elif op.type == "Int8FC":
            c_in = blobs[op.input[0]][0]
            fit_weights(op, c_in, num_classes, (num_classes, c_in), LOGIT_STEPS)
        elif op.type in ("Int8Sum", "Int8SumRelu"):
            (c, _, _, ma), (_, _, _, mb) = blobs[op.input[0]], blobs[op.input[1]]
            y_zp = int(_arg(op, "Y_zero_point", 0))
            blobs[op.output[0]] = (c, float(_arg(op, "Y_scale")), y_zp, (ma + mb) / (2 if y_zp == 0 else 1))
        elif op.type == "Int8AveragePool":
            c, _, _, moment = blobs[op.input[0]]
            # A spatial mean's second moment is at most its input's: logits stay inside their range.
            blobs[op.output[0]] = (c, float(_arg(op, "Y_scale")), int(_arg(op, "Y_zero_point", 0)), moment)
        elif op.output and op.input and op.input[0] in blobs:
            blobs[op.output[0]] = blobs[op.input[0]]
    init_net = make_net(f"{predict_net.name}_init", fills)
    _center_classifier(init_net, predict_net, rng)
    return init_net


def _center_classifier(init_net: Any, predict_net: Any, rng: np.random.Generator) -> None:
    """Refit the last Int8FC's weight scale and bias on the features of a few random images.

    Random convolutions give every channel a large image-independent mean; left in, it would
    make the same classes win (and saturate) for every image. The bias cancels each class's
    mean logit and the scale spreads what varies from image to image over LOGIT_STEPS steps."""
    fc_index = max(i for i, op in enumerate(predict_net.op) if op.type == "Int8FC")
    fc = predict_net.op[fc_index]
    source = max(i for i, op in enumerate(predict_net.op[:fc_index]) if fc.input[0] in op.output)
    model = convert_nets(init_net, predict_net, trace_int8=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # Image-like inputs: smooth random fields (7x7 blocks of 32 pixels) with a little fine noise.
    coarse = rng.standard_normal((8, 3, 7, 7)).repeat(32, axis=2).repeat(32, axis=3)
    images = (coarse + 0.2 * rng.standard_normal(coarse.shape)).astype(np.float32)
    (features,) = session.run([int8_trace_name(source, fc.input[0])], {session.get_inputs()[0].name: images})
    # The producer's own arguments: a blob name can be reused later in the net for another tensor.
    x_scale, x_zp = float(_arg(predict_net.op[source], "Y_scale")), int(_arg(predict_net.op[source], "Y_zero_point", 0))
    weight = read_constants(init_net)[fc.input[1]]
    centred = (features.reshape(len(features), -1).astype(np.float64) - x_zp) * x_scale
    logits = centred @ (weight.values.astype(np.float64) - weight.zero_point).T  # in units of the weight scale
    w_scale = LOGIT_STEPS * float(_arg(fc, "Y_scale")) / (logits - logits.mean(axis=0)).std()
    bias = np.rint(-logits.mean(axis=0) / x_scale).astype(np.int32)
    for position, op in enumerate(init_net.op):
        if op.output[0] == fc.input[1]:
            init_net.op[position].CopyFrom(int8_fill(fc.input[1], weight.values, w_scale, weight.zero_point))
        elif op.output[0] == fc.input[2]:
            init_net.op[position].CopyFrom(int32_fill(fc.input[2], bias, x_scale * w_scale))
