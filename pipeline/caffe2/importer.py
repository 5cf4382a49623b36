"""Convert a Caffe2 int8 predictor (init_net + predict_net) into an int8 ONNX model.

Covered: the operators of the Caffe2 model zoo's int8 ResNet-50 (DNNLOWP engine) and
MobileNetV2 (Caffe2's default, QNNPACK-based `Int8*` operators), in both engines' forms. The
engine decides the arithmetic: DNNLOWP (fbgemm) requantises in float with round half to even,
which onnxruntime's QLinear* operators do too; QNNPACK's fixed-point requantisation is built
from integer ONNX operators by `pipeline.caffe2.qnnpack`. Every activation keeps the uint8
scale and zero point stored in the Caffe2 files (`Y_scale`, `Y_zero_point`), every weight keeps its uint8 values and zero
point, every bias its int32 values (scale = input scale x weight scale, as both Caffe2
engines compute it). The ONNX graph runs natively in NCHW: weights stored NHWC are
transposed at import time, and a blob's Caffe2 memory order only matters where a tensor
is flattened (FC, Flatten, Reshape), where a Transpose is inserted.

Mapping:
  Int8Quantize / Quantize[DNNLOWP]        -> QuantizeLinear
  Int8Dequantize / Dequantize[DNNLOWP]    -> DequantizeLinear
  Conv(Relu)[DNNLOWP], Int8Conv(Relu)[DNNLOWP] -> QLinearConv (+ Clip at the zero point for ReLU)
  Int8Conv(Relu) (QNNPACK, incl. depthwise)    -> ConvInteger + Q31 requantisation (qnnpack.py)
  FC / Int8FC, either engine                   -> the same on [N, K, 1, 1], 1x1 (keeps the bias)
  Sum(Relu) / Int8Sum(Relu)[DNNLOWP], 2 inputs -> a 65,536-entry table of DNNLOWP's sum (fbgemm.py)
  the same with more inputs                    -> DequantizeLinear, Sum, QuantizeLinear
  Int8Sum(Relu) / Int8Add(Relu) (QNNPACK)      -> a 65,536-entry table of QNNPACK's q8add (qnnpack.py)
  Int8MaxPool / MaxPool[DNNLOWP]               -> MaxPool on uint8
  Int8AveragePool (QNNPACK, no padding)        -> QNNPACK's (global) average pooling (qnnpack.py)
  Int8AveragePool otherwise                    -> com.microsoft QLinear(Global)AveragePool
  Int8Softmax (QNNPACK)                        -> QNNPACK's softargmax lookup table (qnnpack.py)
  Int8Relu, Int8Flatten, Int8Reshape, NCHW2NHWC, NHWC2NCHW, Softmax (float).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeline.caffe2 import fbgemm, qnnpack
from pipeline.caffe2.proto import load_net
from pipeline.config import load_preset
from pipeline.errors import UserError
from pipeline.model_preset import attach_preset
from pipeline.output import check_output_file

OPSET = 13
MS_DOMAIN = "com.microsoft"
DNNLOWP_ENGINES = ("DNNLOWP", "DNNLOWP_16", "DNNLOWP_ACC16")
# LegacyPadding in Caffe2's conv_pool_op_base.h: only NOTSET (0) keeps explicit pads.
LEGACY_PAD_NOTSET = 0
ARITHMETICS = ("exact", "qlinear")


class Caffe2ImportError(UserError):
    """The Caffe2 nets cannot be converted faithfully; the message says where and why."""


@dataclass(frozen=True)
class Blob:
    """What the importer knows about one Caffe2 blob of the predict net."""

    onnx_name: str
    dtype: str  # "float" or "uint8"
    scale: float | None = None
    zero_point: int | None = None
    layout: str = "NCHW"  # Caffe2's memory order of a 4-D blob; the ONNX tensor is always NCHW
    rank: int | None = None
    channels: int | None = None  # size of axis 1 where an operator fixes it (Int8Softmax needs it)


@dataclass(frozen=True)
class Constant:
    """A blob filled by the init net: values in Caffe2's layout, with int8 qparams if any."""

    values: np.ndarray
    scale: float | None = None
    zero_point: int | None = None


class OpArgs:
    """Typed access to an OperatorDef's arguments, by Caffe2's argument names."""

    def __init__(self, op: Any):
        self.by_name = {arg.name: arg for arg in op.arg}

    def has(self, name: str) -> bool:
        return name in self.by_name

    def int(self, name: str, default: int | None = None) -> int | None:
        arg = self.by_name.get(name)
        return int(arg.i) if arg is not None else default

    def float(self, name: str, default: float | None = None) -> float | None:
        arg = self.by_name.get(name)
        return float(arg.f) if arg is not None else default

    def ints(self, name: str) -> list[int] | None:
        arg = self.by_name.get(name)
        return [int(v) for v in arg.ints] if arg is not None else None

    def str(self, name: str, default: str | None = None) -> str | None:
        arg = self.by_name.get(name)
        return arg.s.decode("utf-8") if arg is not None else default


class ConversionContext:
    """ONNX nodes and initialisers under construction, plus the blob table."""

    def __init__(self, constants: dict[str, Constant], arithmetic: str = "exact"):
        self.constants = constants
        # "exact": each engine's own integer/float arithmetic; "qlinear": onnxruntime's QLinear*
        # operators wherever they exist (faster, within one step per operator).
        self.arithmetic = arithmetic
        self.blobs: dict[str, Blob] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        # (operator index, Caffe2 output blob, ONNX tensor) of every uint8 operator output.
        self.int8_outputs: list[tuple[int, str, str]] = []

    def fresh(self, hint: str) -> str:
        name, n = hint, 1
        while name in self.names:
            n += 1
            name = f"{hint}_{n}"
        self.names.add(name)
        return name

    def initializer(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scale(self, hint: str, value: float) -> str:
        return self.initializer(f"{hint}_scale", np.array(value, dtype=np.float32))

    def zero_point(self, hint: str, value: int, dtype: type = np.uint8) -> str:
        return self.initializer(f"{hint}_zero_point", np.array(value, dtype=dtype))

    def qparams(self, hint: str, scale: float, zero_point: int) -> list[str]:
        """The (scale, uint8 zero point) inputs of a QuantizeLinear or DequantizeLinear."""
        return [self.scale(hint, scale), self.zero_point(hint, zero_point)]

    def node(self, op_type: str, inputs: list[str], hint: str, domain: str = "", **attrs: Any) -> str:
        output = self.fresh(hint)
        self.nodes.append(
            helper.make_node(op_type, inputs, [output], name=self.fresh(f"{hint}/{op_type}"), domain=domain or None, **attrs)
        )
        return output


class OpConverter:
    """Converts one predict-net operator; knows its position for error messages."""

    def __init__(self, ctx: ConversionContext, op: Any, index: int):
        self.ctx = ctx
        self.op = op
        self.index = index
        self.args = OpArgs(op)
        self.dnnlowp = op.engine in DNNLOWP_ENGINES
        self.exact = ctx.arithmetic == "exact"
        self.hint = op.output[0] if op.output else f"op{index}"

    def fail(self, reason: str) -> Caffe2ImportError:
        name = f" {self.op.name!r}" if self.op.name else ""
        engine = f" (engine {self.op.engine})" if self.op.engine else ""
        return Caffe2ImportError(f"predict net operator #{self.index} {self.op.type}{name}{engine}: {reason}")

    # -- inputs and outputs -------------------------------------------------------------

    def blob(self, position: int, dtype: str | None = "uint8") -> Blob:
        """The converted input blob at `position`; `dtype` None accepts any."""
        if position >= len(self.op.input):
            raise self.fail(f"expects at least {position + 1} inputs")
        name = self.op.input[position]
        if name not in self.ctx.blobs:
            source = "a weight from the init net" if name in self.ctx.constants else "never produced"
            raise self.fail(f"input {name!r} is {source}, where an activation was expected")
        blob = self.ctx.blobs[name]
        if dtype is not None and blob.dtype != dtype:
            raise self.fail(f"input {name!r} is {blob.dtype}, expected {dtype}")
        return blob

    def constant(self, position: int) -> Constant:
        name = self.op.input[position]
        if name not in self.ctx.constants:
            raise self.fail(f"input {name!r} must be filled by the init net")
        return self.ctx.constants[name]

    def output_qparams(self, default: Blob | None = None, relu: bool = False) -> tuple[float, int]:
        """The output's (scale, zero point): Y_scale / Y_zero_point as Caffe2 uses them."""
        if self.args.int("dequantize_output", 0):
            raise self.fail("dequantize_output=1 (float output of an int8 operator) is not supported")
        if self.args.has("Y_scale"):
            scale, zero_point = float(np.float32(self.args.float("Y_scale"))), self.args.int("Y_zero_point", 0)
        elif default is not None:
            scale, zero_point = default.scale, default.zero_point
        else:
            raise self.fail("no Y_scale argument: dynamic output quantisation cannot be expressed in ONNX")
        if not 0 <= zero_point <= 255:
            raise self.fail(f"Y_zero_point {zero_point} is outside uint8")
        for precision in ("activation_precision", "weight_precision"):
            if self.args.int(precision, 8) != 8:
                raise self.fail(f"{precision}={self.args.int(precision)}: only 8-bit quantisation is supported")
        followed_by = self.args.str("followed_by")
        if followed_by not in (None, "Relu"):
            raise self.fail(f"followed_by={followed_by!r} is not supported")
        if self.dnnlowp and (relu or followed_by == "Relu") and self.args.has("Y_scale"):
            scale, zero_point = dnnlowp_relu_qparams(scale, zero_point)
            if self.args.int("force_scale_power_of_two", 0):
                raise self.fail("force_scale_power_of_two is not supported")
        return scale, zero_point

    def set_output(self, onnx_name: str, like: Blob, position: int = 0, **changes: Any) -> None:
        blob = replace(like, onnx_name=onnx_name, **changes)
        self.ctx.blobs[self.op.output[position]] = blob
        if blob.dtype == "uint8":
            self.ctx.int8_outputs.append((self.index, self.op.output[position], onnx_name))

    # -- shared pieces ------------------------------------------------------------------

    def qnnpack(self, build: Callable[[], str]) -> str:
        """Run a `pipeline.caffe2.qnnpack` builder, turning its parameter errors into this op's."""
        try:
            return build()
        except qnnpack.QnnpackParameterError as exc:
            raise self.fail(f"{exc}; Caffe2's QNNPACK operators refuse it too") from None

    def lookup_pair(self, a: str, b: str, table: np.ndarray) -> str:
        """table[a * 256 + b] for two uint8 tensors: any function of a pair of bytes."""
        index = self.ctx.node("Add", [
            self.ctx.node("Mul", [self.ctx.node("Cast", [a], f"{self.hint}_a32", to=TensorProto.INT32),
                                  self.ctx.initializer(f"{self.hint}_256", np.array(256, np.int32))], f"{self.hint}_a256"),
            self.ctx.node("Cast", [b], f"{self.hint}_b32", to=TensorProto.INT32),
        ], f"{self.hint}_pair")
        return self.ctx.node("Gather", [self.ctx.initializer(f"{self.hint}_table", table), index], self.hint, axis=0)

    def qparams_inputs(self, blob: Blob, hint: str) -> list[str]:
        return self.ctx.qparams(hint, blob.scale, blob.zero_point)

    def clip_at_zero_point(self, tensor: str, zero_point: int) -> str:
        """ReLU on a uint8 tensor: real 0 is the zero point, so clamp below it."""
        return self.ctx.node("Clip", [tensor, self.ctx.zero_point(f"{self.hint}_relu_min", zero_point)], f"{self.hint}_relu")

    def requantize(self, blob: Blob, scale: float, zero_point: int) -> str:
        """Move a uint8 tensor to other qparams (only where Caffe2 itself requantises)."""
        if (blob.scale, blob.zero_point) == (scale, zero_point):
            return blob.onnx_name
        real = self.ctx.node("DequantizeLinear", [blob.onnx_name, *self.qparams_inputs(blob, f"{self.hint}_in")], f"{self.hint}_real")
        return self.ctx.node(
            "QuantizeLinear", [real, *self.ctx.qparams(self.hint, scale, zero_point)], self.hint
        )

    def to_nchw_memory_order(self, blob: Blob) -> str:
        """A tensor whose row-major order is Caffe2's, for ops that flatten it."""
        if blob.rank == 4 and blob.layout == "NHWC":
            return self.ctx.node("Transpose", [blob.onnx_name], f"{self.hint}_nhwc", perm=[0, 2, 3, 1])
        return blob.onnx_name

    def order(self) -> str:
        # ConvPoolOpBase's default is NCHW; QNNPACK's Int8 ops insist on an explicit NHWC.
        order = self.args.str("order", "NCHW").upper()
        if order not in ("NCHW", "NHWC"):
            raise self.fail(f"unknown order {order!r}")
        return order

    def window(self, kernel_from_weights: tuple[int, int] | None = None) -> dict[str, list[int]]:
        """kernel/stride/pad/dilation arguments of ConvPoolOpBase as ONNX attributes."""
        args = self.args
        if args.int("legacy_pad", LEGACY_PAD_NOTSET) != LEGACY_PAD_NOTSET:
            raise self.fail("legacy_pad is not supported")
        kernel = _pair(args, "kernel", "kernels", ("kernel_h", "kernel_w"), None)
        if kernel_from_weights is not None:
            if kernel is not None and tuple(kernel) != kernel_from_weights:
                raise self.fail(f"kernel {kernel} disagrees with the weight shape {kernel_from_weights}")
            kernel = list(kernel_from_weights)
        if kernel is None:
            raise self.fail("no kernel size")
        strides = _pair(args, "stride", "strides", ("stride_h", "stride_w"), [1, 1])
        dilations = _pair(args, "dilation", "dilations", ("dilation_h", "dilation_w"), [1, 1])
        if args.has("pads"):
            pads = args.ints("pads")  # Caffe2 order t, l, b, r == ONNX's h_begin, w_begin, h_end, w_end
        elif args.has("pad"):
            pads = [args.int("pad")] * 4
        else:
            pads = [args.int(name, 0) for name in ("pad_t", "pad_l", "pad_b", "pad_r")]
        if len(kernel) != 2 or len(pads) != 4:
            raise self.fail("only 2-D windows are supported")
        return {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations}


def _pair(args: OpArgs, single: str, plural: str, split: tuple[str, str], default: list[int] | None) -> list[int] | None:
    if args.has(plural):
        return args.ints(plural)
    if args.has(single):
        return [args.int(single)] * 2
    if args.has(split[0]) or args.has(split[1]):
        return [args.int(split[0], 1), args.int(split[1], 1)]
    return default


def dnnlowp_relu_qparams(scale: float, zero_point: int) -> tuple[float, int]:
    """Output qparams DNNLOWP actually uses for a ReLU-fused op with static Y_scale.

    DNNLOWP re-chooses them as min-max parameters over [0, Max()], Max() being the real
    value of 255 (caffe2_dnnlowp_utils.cc, AdjustOutputTensorQuantizationParamsWithFollowedBy):
    scale' = Max() / 255 and zero point 0. With Y_zero_point 0 this gives back Y_scale.
    """
    top = np.float32(np.float32(scale) * np.float32(255 - zero_point))
    return float(np.float32(float(top) / 255.0)), 0


# -- operator converters --------------------------------------------------------------


def convert_quantize(cv: OpConverter) -> None:
    x = cv.blob(0, "float")
    if len(cv.op.input) > 1:
        raise cv.fail("quantisation parameters given as input blobs are not supported")
    scale, zero_point = cv.output_qparams()
    y = cv.ctx.node("QuantizeLinear", [x.onnx_name, *cv.ctx.qparams(cv.hint, scale, zero_point)], cv.hint)
    cv.set_output(y, x, dtype="uint8", scale=scale, zero_point=zero_point)


def convert_dequantize(cv: OpConverter) -> None:
    x = cv.blob(0)
    y = cv.ctx.node("DequantizeLinear", [x.onnx_name, *cv.qparams_inputs(x, cv.hint)], cv.hint)
    cv.set_output(y, x, dtype="float", scale=None, zero_point=None)


def _bias(cv: OpConverter, x: Blob, weight: Constant, channels: int) -> str | None:
    """The int32 bias of QLinearConv, whose scale is x_scale * w_scale."""
    if len(cv.op.input) < 3:
        return None
    bias = cv.constant(2)
    if bias.values.size != channels:
        raise cv.fail(f"bias {cv.op.input[2]!r} has {bias.values.size} values for {channels} output channels")
    if bias.values.dtype == np.float32:
        # DNNLOWP quantises a float bias itself, with zero point 0 at x_scale * w_scale.
        step = np.float32(x.scale) * np.float32(weight.scale)
        values = np.rint(bias.values.reshape(-1) / step).astype(np.int64)
        values = np.clip(values, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
    elif bias.values.dtype == np.int32:
        if bias.zero_point not in (None, 0):
            raise cv.fail(f"bias {cv.op.input[2]!r} has zero point {bias.zero_point}; Caffe2 requires 0")
        values = bias.values.reshape(-1)
    else:
        raise cv.fail(f"bias {cv.op.input[2]!r} must be int32 or float, not {bias.values.dtype}")
    return cv.ctx.initializer(cv.op.input[2], values)


def _quantized_weight(cv: OpConverter, position: int) -> Constant:
    weight = cv.constant(position)
    if weight.values.dtype != np.uint8 or weight.scale is None:
        raise cv.fail(
            f"weight {cv.op.input[position]!r} is not an int8 tensor (Int8GivenTensorFill); "
            "on-the-fly weight quantisation is not supported"
        )
    return weight


def signed_weight(values: np.ndarray) -> np.ndarray:
    """uint8 weights as int8, shifted by 128 (the zero point moves with them).

    (w - zp) is unchanged, so the arithmetic is identical; it is what DNNLOWP does with
    Int8 weights (conv_dnnlowp_op.cc) and lets onnxruntime use its u8s8 kernels, about
    twice as fast as u8u8 on x86.
    """
    return (values.astype(np.int16) - 128).astype(np.int8)


def _int8_conv(cv: OpConverter, x_name: str, x: Blob, weight_oihw: np.ndarray, weight: Constant,
               bias: str | None, relu: bool, **attrs: Any) -> tuple[str, float, int]:
    """The engine's int8 convolution: DNNLOWP's float requantisation is QLinearConv's;
    QNNPACK's fixed-point one needs ConvInteger and integer requantisation."""
    if cv.dnnlowp or not cv.exact:
        return _qlinear_conv(cv, x_name, x, weight_oihw, weight, bias, relu, **attrs)
    scale, zero_point = cv.output_qparams(relu=relu)
    acc = cv.ctx.node("ConvInteger", [
        x_name, cv.ctx.initializer(cv.op.input[1], weight_oihw),
        cv.ctx.zero_point(f"{cv.hint}_x", x.zero_point), cv.ctx.zero_point(cv.op.input[1], weight.zero_point),
    ], f"{cv.hint}_acc", **attrs)
    if bias is not None:
        per_channel = cv.ctx.node("Reshape", [bias, cv.ctx.initializer(f"{cv.hint}_c11", np.array([-1, 1, 1], np.int64))],
                                  f"{cv.hint}_bias_c11")
        acc = cv.ctx.node("Add", [acc, per_channel], f"{cv.hint}_acc_bias")
    requant_scale = qnnpack.conv_scale(x.scale, weight.scale, scale)
    # Caffe2's activationLimits: a fused ReLU clamps at the output zero point.
    y = cv.qnnpack(lambda: qnnpack.requantize_q31(cv.ctx, acc, requant_scale, zero_point,
                                                  zero_point if relu else 0, 255, cv.hint))
    return y, scale, zero_point


def _qlinear_conv(cv: OpConverter, x_name: str, x: Blob, weight_oihw: np.ndarray, weight: Constant,
                  bias: str | None, relu: bool, **attrs: Any) -> tuple[str, float, int]:
    scale, zero_point = cv.output_qparams(relu=relu)
    inputs = [
        x_name, *cv.qparams_inputs(x, f"{cv.hint}_x"),
        cv.ctx.initializer(cv.op.input[1], signed_weight(weight_oihw)),
        cv.ctx.scale(cv.op.input[1], weight.scale),
        cv.ctx.zero_point(cv.op.input[1], weight.zero_point - 128, np.int8),
        *cv.ctx.qparams(cv.hint, scale, zero_point),
    ]
    if bias is not None:
        inputs.append(bias)
    y = cv.ctx.node("QLinearConv", inputs, f"{cv.hint}_conv" if relu else cv.hint, **attrs)
    if relu:
        y = cv.clip_at_zero_point(y, zero_point)
    return y, scale, zero_point


def convert_conv(cv: OpConverter, relu: bool) -> None:
    x = cv.blob(0)
    weight = _quantized_weight(cv, 1)
    if weight.values.ndim != 4:
        raise cv.fail("only 2-D convolutions are supported")
    order = cv.order()
    # Caffe2 filters: NCHW order [M, C/g, kH, kW]; NHWC order [M, kH, kW, C/g].
    w = weight.values if order == "NCHW" else weight.values.transpose(0, 3, 1, 2)
    attrs = cv.window(kernel_from_weights=(int(w.shape[2]), int(w.shape[3])))
    group = cv.args.int("group", 1)
    bias = _bias(cv, x, weight, int(w.shape[0]))
    y, scale, zero_point = _int8_conv(cv, x.onnx_name, x, np.ascontiguousarray(w), weight, bias, relu, group=group, **attrs)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout=order, rank=4, channels=int(w.shape[0]))


def convert_fc(cv: OpConverter) -> None:
    x = cv.blob(0)
    weight = _quantized_weight(cv, 1)
    if cv.args.int("axis", 1) != 1 or cv.args.int("axis_w", 1) != 1:
        raise cv.fail("only axis=1 and axis_w=1 are supported")
    w = weight.values.reshape(weight.values.shape[0], -1)
    # FC as a 1x1 QLinearConv on [N, K, 1, 1]: the int32 bias and a single requantisation,
    # exactly like Caffe2's FC; QLinearMatMul has no bias input.
    as_image = cv.ctx.node(
        "Reshape", [cv.to_nchw_memory_order(x), cv.ctx.initializer(f"{cv.hint}_nk11", np.array([0, -1, 1, 1], np.int64))],
        f"{cv.hint}_nk11",
    )
    bias = _bias(cv, x, weight, int(w.shape[0]))
    conv_out, scale, zero_point = _int8_conv(
        cv, as_image, x, w.reshape(*w.shape, 1, 1), weight, bias, False, kernel_shape=[1, 1]
    )
    y = cv.ctx.node("Reshape", [conv_out, cv.ctx.initializer(f"{cv.hint}_nm", np.array([0, -1], np.int64))], cv.hint)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout="NCHW", rank=2, channels=int(w.shape[0]))


def convert_sum(cv: OpConverter, relu: bool) -> None:
    inputs = [cv.blob(i) for i in range(len(cv.op.input))]
    if not inputs:
        raise cv.fail("no inputs")
    first = inputs[0]
    if cv.args.int("broadcast", 0):
        raise cv.fail("broadcast=1 (Caffe2's legacy axis broadcasting) is not supported")
    scale, zero_point = cv.output_qparams(relu=relu)
    lo = zero_point if relu else 0  # a fused ReLU clamps at the output zero point
    if len(inputs) == 2:
        (a, b), y_qparams = inputs, (scale, zero_point)
        a_qparams, b_qparams = (a.scale, a.zero_point), (b.scale, b.zero_point)
        if not cv.exact:
            y = cv.ctx.node("QLinearAdd", [a.onnx_name, *cv.qparams_inputs(a, f"{cv.hint}_a"), b.onnx_name,
                                           *cv.qparams_inputs(b, f"{cv.hint}_b"), *cv.ctx.qparams(cv.hint, scale, zero_point)],
                            f"{cv.hint}_add" if relu else cv.hint, domain=MS_DOMAIN)
            y = cv.clip_at_zero_point(y, zero_point) if relu else y
        else:
            table = (fbgemm.sum_table(a_qparams, b_qparams, y_qparams, lo, 255) if cv.dnnlowp else
                     cv.qnnpack(lambda: qnnpack.add_table(a_qparams, b_qparams, y_qparams, lo, 255)))
            y = cv.lookup_pair(a.onnx_name, b.onnx_name, table)
    elif not cv.dnnlowp:
        raise cv.fail(f"{len(inputs)} inputs: Caffe2's QNNPACK Int8Add/Int8Sum takes exactly 2")
    else:
        reals = [
            cv.ctx.node("DequantizeLinear", [blob.onnx_name, *cv.qparams_inputs(blob, f"{cv.hint}_in{i}")], f"{cv.hint}_in{i}_real")
            for i, blob in enumerate(inputs)
        ]
        total = cv.ctx.node("Sum", reals, f"{cv.hint}_real") if len(reals) > 1 else reals[0]
        y = cv.ctx.node("QuantizeLinear", [total, *cv.ctx.qparams(cv.hint, scale, zero_point)],
                        f"{cv.hint}_sum" if relu else cv.hint)
        if relu:
            y = cv.clip_at_zero_point(y, zero_point)
    cv.set_output(y, first, scale=scale, zero_point=zero_point)


def convert_relu(cv: OpConverter) -> None:
    x = cv.blob(0)
    scale, zero_point = cv.output_qparams(default=x)
    y = cv.clip_at_zero_point(cv.requantize(x, scale, zero_point), zero_point)
    cv.set_output(y, x, scale=scale, zero_point=zero_point)


def convert_max_pool(cv: OpConverter) -> None:
    x = cv.blob(0)
    order = cv.order()
    scale, zero_point = cv.output_qparams(default=x)
    if cv.args.int("global_pooling", 0):
        pooled = cv.ctx.node("GlobalMaxPool", [x.onnx_name], f"{cv.hint}_pool")
    else:
        pooled = cv.ctx.node("MaxPool", [x.onnx_name], f"{cv.hint}_pool", **cv.window())
    # Max pooling commutes with the (monotonic) requantisation Caffe2 applies when Y differs.
    y = cv.requantize(replace(x, onnx_name=pooled), scale, zero_point)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout=order, rank=4)


def convert_average_pool(cv: OpConverter) -> None:
    x = cv.blob(0)
    order = cv.order()
    scale, zero_point = cv.output_qparams(default=x)

    def qinputs() -> list[str]:
        return [x.onnx_name, *cv.qparams_inputs(x, f"{cv.hint}_x"), *cv.ctx.qparams(cv.hint, scale, zero_point)]
    if cv.args.int("global_pooling", 0):
        y = cv.ctx.node("QLinearGlobalAveragePool", qinputs(), cv.hint, domain=MS_DOMAIN, channels_last=0)
    else:
        window = cv.window()
        if window["dilations"] != [1, 1]:
            raise cv.fail("dilated average pooling is not supported")
        del window["dilations"]
        if not cv.dnnlowp and cv.exact and not any(window["pads"]):
            # Without padding every window has kernel-size elements, as QNNPACK's kernels assume.
            y = cv.qnnpack(lambda: qnnpack.average_pool(cv.ctx, x.onnx_name, (x.scale, x.zero_point),
                                                        (scale, zero_point), window, 0, 255, cv.hint))
        else:
            # Caffe2's int8 average pooling divides by the number of non-padding elements.
            y = cv.ctx.node("QLinearAveragePool", qinputs(), cv.hint, domain=MS_DOMAIN, count_include_pad=0, **window)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout=order, rank=4)


def convert_flatten(cv: OpConverter) -> None:
    x = cv.blob(0)
    axis = cv.args.int("axis", 1)
    scale, zero_point = cv.output_qparams(default=x)
    flat = cv.ctx.node("Flatten", [cv.to_nchw_memory_order(x)], cv.hint, axis=axis)
    y = cv.requantize(replace(x, onnx_name=flat), scale, zero_point)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout="NCHW", rank=2, channels=None)


def convert_reshape(cv: OpConverter) -> None:
    x = cv.blob(0)
    if cv.args.has("shape"):
        shape = cv.args.ints("shape")
    elif len(cv.op.input) > 1:
        shape = [int(v) for v in cv.constant(1).values.reshape(-1)]
    else:
        raise cv.fail("no shape argument or shape input")
    scale, zero_point = cv.output_qparams(default=x)
    shaped = cv.ctx.node(
        "Reshape", [cv.to_nchw_memory_order(x), cv.ctx.initializer(f"{cv.hint}_shape", np.array(shape, np.int64))], cv.hint
    )
    y = cv.requantize(replace(x, onnx_name=shaped), scale, zero_point)
    cv.set_output(y, x, scale=scale, zero_point=zero_point, layout="NCHW", rank=len(shape), channels=None)
    if len(cv.op.output) > 1:
        # Caffe2's second output (old_shape) is a shape tensor nothing downstream of a
        # classifier consumes; recorded as "shape" so a consumer fails with a clear message.
        cv.ctx.blobs[cv.op.output[1]] = Blob(onnx_name="", dtype="shape")


def convert_layout(cv: OpConverter, layout: str) -> None:
    x = cv.blob(0, dtype=None)
    # The ONNX tensor stays NCHW; only Caffe2's notion of its memory order changes.
    cv.set_output(x.onnx_name, x, layout=layout)


def convert_softmax(cv: OpConverter) -> None:
    x = cv.blob(0, "float")
    axis = cv.args.int("axis", 1)
    source = cv.to_nchw_memory_order(x)
    if x.rank == 2 and axis == 1:
        y = cv.ctx.node("Softmax", [source], cv.hint, axis=1)
    else:
        # Caffe2 Softmax works on the input coerced to 2-D at `axis`.
        flat = cv.ctx.node("Flatten", [source], f"{cv.hint}_2d", axis=axis)
        probs = cv.ctx.node("Softmax", [flat], f"{cv.hint}_2d_softmax", axis=1)
        y = cv.ctx.node("Reshape", [probs, cv.ctx.node("Shape", [source], f"{cv.hint}_shape")], cv.hint)
    cv.set_output(y, x, layout="NCHW")


def convert_int8_softmax(cv: OpConverter) -> None:
    """QNNPACK's softargmax over the classes of an [N, classes] uint8 tensor."""
    x = cv.blob(0)
    scale, zero_point = cv.output_qparams()
    if (np.float32(scale), zero_point) != (np.float32(1 / 256), 0):
        raise cv.fail(f"output scale {scale:.7g} and zero point {zero_point}: QNNPACK's softargmax "
                      "only produces scale 1/256 with zero point 0")
    if x.rank != 2 or x.channels is None:
        raise cv.fail("input must be the [N, classes] output of an Int8FC (its class count sets QNNPACK's table)")
    y = qnnpack.softargmax(cv.ctx, x.onnx_name, x.scale, x.channels, cv.hint)
    cv.set_output(y, x, scale=scale, zero_point=zero_point)


PREDICT_CONVERTERS: dict[tuple[str, bool], Callable[[OpConverter], None]] = {}


def _register(types: list[str], converter: Callable[[OpConverter], None], dnnlowp_only: bool = False) -> None:
    for op_type in types:
        PREDICT_CONVERTERS[(op_type, True)] = converter
        if not dnnlowp_only:
            PREDICT_CONVERTERS[(op_type, False)] = converter


_register(["Int8Quantize"], convert_quantize)
_register(["Quantize"], convert_quantize, dnnlowp_only=True)
_register(["Int8Dequantize"], convert_dequantize)
_register(["Dequantize"], convert_dequantize, dnnlowp_only=True)
_register(["Int8Conv"], lambda cv: convert_conv(cv, relu=False))
_register(["Int8ConvRelu"], lambda cv: convert_conv(cv, relu=True))
_register(["Conv"], lambda cv: convert_conv(cv, relu=False), dnnlowp_only=True)
_register(["ConvRelu"], lambda cv: convert_conv(cv, relu=True), dnnlowp_only=True)
_register(["Int8FC"], convert_fc)
_register(["FC"], convert_fc, dnnlowp_only=True)
_register(["Int8Sum", "Int8Add"], lambda cv: convert_sum(cv, relu=False))
_register(["Int8SumRelu", "Int8AddRelu"], lambda cv: convert_sum(cv, relu=True))
_register(["Sum", "Add"], lambda cv: convert_sum(cv, relu=False), dnnlowp_only=True)
_register(["SumRelu"], lambda cv: convert_sum(cv, relu=True), dnnlowp_only=True)
_register(["Int8Relu"], convert_relu)
_register(["Relu"], convert_relu, dnnlowp_only=True)
_register(["Int8MaxPool"], convert_max_pool)
_register(["MaxPool"], convert_max_pool, dnnlowp_only=True)
_register(["Int8AveragePool"], convert_average_pool)
_register(["AveragePool"], convert_average_pool, dnnlowp_only=True)
_register(["Int8Flatten"], convert_flatten)
_register(["Int8Reshape"], convert_reshape)
_register(["NCHW2NHWC", "Int8NCHW2NHWC"], lambda cv: convert_layout(cv, "NHWC"))
_register(["NHWC2NCHW", "Int8NHWC2NCHW"], lambda cv: convert_layout(cv, "NCHW"))
_register(["Softmax"], convert_softmax)
# QNNPACK's operator only: DNNLOWP has no Int8Softmax of its own.
PREDICT_CONVERTERS[("Int8Softmax", False)] = convert_int8_softmax


# -- the init net ---------------------------------------------------------------------


def _fill_values(op: Any, args: OpArgs) -> np.ndarray:
    values_arg = args.by_name.get("values")
    if values_arg is None:
        raise ValueError("no values argument")
    if op.type == "Int8GivenTensorFill":
        return np.frombuffer(values_arg.s, dtype=np.uint8).copy()
    if op.type in ("Int8GivenIntTensorFill", "GivenTensorIntFill"):
        return np.array(values_arg.ints, dtype=np.int32)
    if op.type == "GivenTensorInt64Fill":
        return np.array(values_arg.ints, dtype=np.int64)
    return np.array(values_arg.floats, dtype=np.float32)


INIT_FILLS = ("Int8GivenTensorFill", "Int8GivenIntTensorFill", "GivenTensorFill", "GivenTensorIntFill", "GivenTensorInt64Fill")


def read_constants(init_net: Any) -> dict[str, Constant]:
    """Blob name -> Constant for every fill of the init net."""
    constants: dict[str, Constant] = {}
    for index, op in enumerate(init_net.op):
        where = f"init net operator #{index} {op.type}" + (f" {op.name!r}" if op.name else "")
        if op.type not in INIT_FILLS:
            raise Caffe2ImportError(f"{where}: not supported (the init net may only hold {', '.join(INIT_FILLS)})")
        args = OpArgs(op)
        try:
            values = _fill_values(op, args)
        except ValueError as exc:
            raise Caffe2ImportError(f"{where}: {exc}") from exc
        shape = args.ints("shape") or [values.size]
        if int(np.prod(shape)) != values.size:
            raise Caffe2ImportError(f"{where}: {values.size} values do not fill shape {shape}")
        is_int8 = op.type.startswith("Int8")
        constants[op.output[0]] = Constant(
            values=values.reshape(shape),
            scale=float(np.float32(args.float("Y_scale", 1.0))) if is_int8 else None,
            zero_point=args.int("Y_zero_point", 0) if is_int8 else None,
        )
    return constants


# -- the whole model ------------------------------------------------------------------


def convert_nets(init_net: Any, predict_net: Any, input_size: int = 224, trace_int8: bool = False,
                 arithmetic: str = "exact") -> onnx.ModelProto:
    """ONNX model of the Caffe2 predictor, taking float NCHW [N, 3, size, size] input.

    `arithmetic` "exact" builds each engine's own arithmetic; "qlinear" uses onnxruntime's
    QLinearConv/QLinearAdd/QLinearAveragePool instead (faster, within one step per operator).

    `trace_int8` adds every operator's uint8 output as a graph output named
    `int8_trace_name(index, blob)`, to check the model against Caffe2's arithmetic op by op."""
    constants = read_constants(init_net)
    if arithmetic not in ARITHMETICS:
        raise Caffe2ImportError(f"unknown arithmetic {arithmetic!r}: {' or '.join(ARITHMETICS)}")
    ctx = ConversionContext(constants, arithmetic)
    # Caffe2's Predictor creates an empty blob for every external input the init net does not
    # fill: one that no operator reads (e.g. a training data queue) is harmless and ignored.
    read = {name for op in predict_net.op for name in op.input}
    candidates = [name for name in predict_net.external_input if name not in constants and name in read]
    if not candidates:
        # Some exported predictors also fill the data blob in the init net: Caffe2
        # lists the data input first.
        candidates = list(predict_net.external_input[:1])
    if len(candidates) != 1:
        raise Caffe2ImportError(
            f"predict net has {len(candidates)} external inputs that operators read and the init net "
            f"does not fill ({', '.join(candidates) or 'none'}); expected exactly one image input"
        )
    input_name = candidates[0]
    constants.pop(input_name, None)
    ctx.names.add(input_name)
    ctx.blobs[input_name] = Blob(onnx_name=input_name, dtype="float", layout="NCHW", rank=4)

    outputs = list(predict_net.external_output) or [predict_net.op[-1].output[0]]
    # Reserved so the graph outputs keep the Caffe2 blob names exactly.
    ctx.names.update(outputs)

    for index, op in enumerate(predict_net.op):
        cv = OpConverter(ctx, op, index)
        converter = PREDICT_CONVERTERS.get((op.type, cv.dnnlowp))
        if converter is None:
            raise cv.fail("operator not supported by import-caffe2")
        converter(cv)

    graph_outputs = []
    for name in outputs:
        blob = ctx.blobs.get(name)
        if blob is None:
            raise Caffe2ImportError(f"external output {name!r} is not produced by the predict net")
        onnx_name = blob.onnx_name
        if blob.dtype == "uint8":
            onnx_name = ctx.node("DequantizeLinear", [onnx_name, *ctx.qparams(name, blob.scale, blob.zero_point)], name)
        elif blob.dtype != "float":
            raise Caffe2ImportError(f"external output {name!r} is not a tensor")
        if onnx_name != name:
            ctx.nodes.append(helper.make_node("Identity", [onnx_name], [name], name=ctx.fresh(f"{name}/Identity")))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for index, blob_name, onnx_name in ctx.int8_outputs if trace_int8 else ():
        traced = int8_trace_name(index, blob_name)
        ctx.nodes.append(helper.make_node("Identity", [onnx_name], [traced], name=ctx.fresh(f"{traced}/Identity")))
        graph_outputs.append(helper.make_tensor_value_info(traced, TensorProto.UINT8, None))

    graph = helper.make_graph(
        ctx.nodes,
        predict_net.name or "caffe2_import",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        graph_outputs,
        initializer=ctx.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="pipeline model import-caffe2",
    )
    model.ir_version = 8
    _declare_output_shapes(model, input_name, input_size)
    onnx.checker.check_model(model)
    return model


def int8_trace_name(index: int, blob_name: str) -> str:
    """The graph output holding operator `index`'s uint8 output `blob_name` (see convert_nets)."""
    return f"int8_trace/{index}/{blob_name}"


def _declare_output_shapes(model: onnx.ModelProto, input_name: str, input_size: int) -> None:
    """Give the graph outputs their shapes (e.g. [N, 1000]) from one onnxruntime run.

    ONNX's own shape inference stops at com.microsoft operators; running the model once on
    a zero image also proves onnxruntime accepts every node before the file is written.
    """
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        results = session.run(None, {input_name: np.zeros((1, 3, input_size, input_size), np.float32)})
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        raise Caffe2ImportError(
            f"onnxruntime cannot run the converted model with input [1, 3, {input_size}, {input_size}]: {exc}"
        ) from exc
    for out, value in zip(model.graph.output, results):
        out.CopyFrom(helper.make_tensor_value_info(out.name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                   ["N", *value.shape[1:]]))


def import_caffe2(init_path: str | Path, predict_path: str | Path, out_path: str | Path,
                  input_size: int = 224, preset: str = "caffe2", arithmetic: str = "exact") -> onnx.ModelProto:
    """Read both nets (binary or text), convert them, and save the ONNX model carrying `preset`
    (the preprocessing it expects) in its metadata."""
    out_path = check_output_file(out_path)  # before the nets are read and converted
    preset_obj = load_preset(preset)
    model = convert_nets(load_net(init_path), load_net(predict_path), input_size=input_size, arithmetic=arithmetic)
    attach_preset(model, preset_obj)
    onnx.save(model, str(out_path))
    return model
