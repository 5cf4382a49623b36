"""QNNPACK's integer arithmetic (Caffe2's default `Int8*` operators) as integer ONNX operators.

onnxruntime's QLinear* operators requantise in float and round half to even; QNNPACK never
does. It turns every float scale into an integer multiplier and a shift, rounds once in the
multiplication and once more in the shift (ties away from zero), so QLinearConv disagrees with
it by one step on a fraction of the outputs. Built here from ConvInteger, integer Mul/Div and
lookup tables, the imported graph gives QNNPACK's bytes exactly.

Each `*_params` function derives QNNPACK's constants from the float32 scales the way
QNNPACK's `requantization.h` does (`qnnp_compute_*_quantization_params`); each graph builder
adds the nodes through the importer's ConversionContext. An addition depends only on its two
uint8 inputs: `add_table` gives its result for all 65,536 pairs, for the graph to look up. Integer division of
non-negative int64 values is floor division in onnxruntime, so the graph only ever divides those.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Q31_ROUNDING = 1 << 30
# Added before a floor division by 2**31 so that the dividend is never negative.
Q31_OFFSET = 1 << 62


class QnnpackParameterError(ValueError):
    """A scale outside the range QNNPACK accepts: Caffe2 itself refuses to run the operator."""


def _f32_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def conv_scale(x_scale: float, w_scale: float, y_scale: float) -> float:
    """input scale x kernel scale / output scale, in float32 like QNNPACK's create functions."""
    return float(np.float32(np.float32(x_scale) * np.float32(w_scale)) / np.float32(y_scale))


def q31_params(scale: float) -> tuple[int, int]:
    """(multiplier, shift) of a convolution or fully connected requantisation.

    The multiplier is the float32 mantissa of `scale` as a Q31 number in [2**30, 2**31);
    the shift its exponent. QNNPACK requires 2**-32 <= scale < 1.
    """
    if not 2.0**-32 <= scale < 1.0:
        raise QnnpackParameterError(f"requantisation scale {scale:.7g} is outside QNNPACK's [2**-32, 1)")
    bits = _f32_bits(scale)
    multiplier = ((bits & 0x007FFFFF) | 0x00800000) << 7
    shift = 127 + 31 - 32 - (bits >> 23)
    return multiplier, shift


def add_params(a_scale: float, b_scale: float, y_scale: float) -> tuple[int, int, int]:
    """(a multiplier, b multiplier, shift) of QNNPACK's q8add: multipliers below 2**22."""
    a_out = float(np.float32(a_scale) / np.float32(y_scale))
    b_out = float(np.float32(b_scale) / np.float32(y_scale))
    for name, value in (("first", a_out), ("second", b_out)):
        if not 2.0**-10 <= value < 2.0**8:
            raise QnnpackParameterError(
                f"{name} input scale / output scale = {value:.7g} is outside QNNPACK's [2**-10, 2**8)")
    exponent = (_f32_bits(max(a_out, b_out)) >> 23) - 127
    shift = 21 - exponent
    # x * 2**shift is exact in float32; lrintf rounds half to even, as np.rint does.
    a_mult = int(np.rint(np.float32(a_out) * np.float32(2.0**shift)))
    b_mult = int(np.rint(np.float32(b_out) * np.float32(2.0**shift)))
    return a_mult, b_mult, shift


def avgpool_params(x_scale: float, y_scale: float, count: int) -> tuple[int, int]:
    """(multiplier, shift) of QNNPACK's (global) average pooling over `count` elements."""
    scale = float(np.float32(x_scale) / np.float32(np.float32(y_scale) * np.float32(count)))
    if not 2.0**-32 <= scale < 256.0:
        raise QnnpackParameterError(f"average pooling scale {scale:.7g} is outside QNNPACK's [2**-32, 256)")
    bits = _f32_bits(scale)
    return (bits & 0x007FFFFF) | 0x00800000, 127 + 23 - (bits >> 23)


def softargmax_table(channels: int, x_scale: float) -> np.ndarray:
    """QNNPACK's softargmax lookup table: round(qscale * exp((i - 255) * x_scale)), i = 0..255."""
    qscale = min(float(np.iinfo(np.uint32).max) / channels, 8388607.0)
    exponents = (np.arange(256, dtype=np.float64) - 255) * float(np.float32(x_scale))
    return np.rint(qscale * np.exp(exponents)).astype(np.int64)


# -- graph builders ---------------------------------------------------------------------


def _const(ctx: Any, hint: str, value: int | np.ndarray, dtype: type = np.int64) -> str:
    return ctx.initializer(hint, np.asarray(value, dtype=dtype))


def _to_uint8(ctx: Any, n: str, zero_point: int, lo: int, hi: int, hint: str) -> str:
    """n + zero point, clamped to [lo, hi], as uint8 (n is int64)."""
    y = ctx.node("Add", [n, _const(ctx, f"{hint}_zp", zero_point)], f"{hint}_biased")
    y = ctx.node("Max", [y, _const(ctx, f"{hint}_lo", lo)], f"{hint}_lo")
    y = ctx.node("Min", [y, _const(ctx, f"{hint}_hi", hi)], f"{hint}_hi")
    return ctx.node("Cast", [y], hint, to=2)  # TensorProto.UINT8


def _rounding_shift(ctx: Any, q: str, shift: int, hint: str) -> str:
    """q / 2**shift rounded to nearest, ties away from zero (QNNPACK's remainder test)."""
    if shift == 0:
        return q
    magnitude = ctx.node("Abs", [q], f"{hint}_abs")
    rounded = ctx.node("Add", [magnitude, _const(ctx, f"{hint}_half", 1 << (shift - 1))], f"{hint}_half")
    quotient = ctx.node("Div", [rounded, _const(ctx, f"{hint}_pow2", 1 << shift)], f"{hint}_shifted")
    return ctx.node("Mul", [quotient, ctx.node("Sign", [q], f"{hint}_sign")], f"{hint}_n")


def requantize_q31(ctx: Any, acc_int32: str, scale: float, zero_point: int, lo: int, hi: int, hint: str) -> str:
    """An int32 accumulator to uint8 the way QNNPACK's q8gemm/q8conv/q8dwconv kernels do."""
    multiplier, shift = q31_params(scale)
    acc = ctx.node("Cast", [acc_int32], f"{hint}_acc64", to=7)  # TensorProto.INT64
    product = ctx.node("Mul", [acc, _const(ctx, f"{hint}_multiplier", multiplier)], f"{hint}_product")
    # (product + 2**30) >> 31 as a floor division of a non-negative number.
    lifted = ctx.node("Add", [product, _const(ctx, f"{hint}_q31_round", Q31_ROUNDING + Q31_OFFSET)], f"{hint}_lifted")
    q31 = ctx.node("Div", [lifted, _const(ctx, f"{hint}_q31_div", 1 << 31)], f"{hint}_q31_lifted")
    q31 = ctx.node("Sub", [q31, _const(ctx, f"{hint}_q31_unlift", Q31_OFFSET >> 31)], f"{hint}_q31")
    return _to_uint8(ctx, _rounding_shift(ctx, q31, shift, hint), zero_point, lo, hi, hint)


def add_table(a_qparams: tuple[float, int], b_qparams: tuple[float, int], y_qparams: tuple[float, int],
              lo: int, hi: int) -> np.ndarray:
    """QNNPACK's q8add for every (a, b), at index a * 256 + b: (a - a_zp) * a_mult + (b - b_zp) * b_mult,
    a rounding shift with ties away from zero, the output zero point, the clamp."""
    (a_scale, a_zp), (b_scale, b_zp), (y_scale, y_zp) = a_qparams, b_qparams, y_qparams
    a_mult, b_mult, shift = add_params(a_scale, b_scale, y_scale)
    a, b = np.divmod(np.arange(256 * 256, dtype=np.int64), 256)
    acc = (a - a_zp) * a_mult + (b - b_zp) * b_mult
    n = np.sign(acc) * ((np.abs(acc) + (1 << (shift - 1))) >> shift)
    return np.clip(n + y_zp, lo, hi).astype(np.uint8)


def average_pool(ctx: Any, x: str, x_qparams: tuple[float, int], y_qparams: tuple[float, int],
                 window: dict[str, list[int]], lo: int, hi: int, hint: str) -> str:
    """QNNPACK's q8avgpool / q8gavgpool on windows without padding: the window sum minus
    count x zero point, times a 24-bit multiplier, shifted with ties away from zero."""
    (x_scale, x_zp), (y_scale, y_zp) = x_qparams, y_qparams
    count = int(np.prod(window["kernel_shape"]))
    multiplier, shift = avgpool_params(x_scale, y_scale, count)
    # The float mean of at most 2**16 uint8 values, times the count and rounded, is the
    # exact integer window sum.
    real = ctx.node("Cast", [x], f"{hint}_float", to=1)  # TensorProto.FLOAT
    mean = ctx.node("AveragePool", [real], f"{hint}_mean", kernel_shape=window["kernel_shape"],
                    strides=window["strides"])
    total = ctx.node("Round", [ctx.node("Mul", [mean, ctx.initializer(f"{hint}_count", np.array(count, np.float32))],
                                        f"{hint}_sum_float")], f"{hint}_sum_rounded")
    acc = ctx.node("Sub", [ctx.node("Cast", [total], f"{hint}_sum", to=7), _const(ctx, f"{hint}_bias", count * x_zp)],
                   f"{hint}_acc")
    product = ctx.node("Mul", [acc, _const(ctx, f"{hint}_multiplier", multiplier)], f"{hint}_product")
    return _to_uint8(ctx, _rounding_shift(ctx, product, shift, hint), y_zp, lo, hi, hint)


def softargmax(ctx: Any, x: str, x_scale: float, channels: int, hint: str) -> str:
    """QNNPACK's q8 softargmax on [N, channels]: table[x - max + 255], normalised to 1/256 steps."""
    x64 = ctx.node("Cast", [x], f"{hint}_x64", to=7)
    top = ctx.node("ReduceMax", [x64], f"{hint}_max", axes=[1], keepdims=1)
    index = ctx.node("Add", [ctx.node("Sub", [x64, top], f"{hint}_from_max"), _const(ctx, f"{hint}_255", 255)],
                     f"{hint}_index")
    table = ctx.initializer(f"{hint}_exp_table", softargmax_table(channels, x_scale))
    t = ctx.node("Gather", [table, index], f"{hint}_exp", axis=0)
    total = ctx.node("ReduceSum", [t, _const(ctx, f"{hint}_axis", [1])], f"{hint}_sum", keepdims=1)
    numerator = ctx.node("Add", [ctx.node("Mul", [t, _const(ctx, f"{hint}_256", 256)], f"{hint}_t256"),
                                 ctx.node("Div", [total, _const(ctx, f"{hint}_2", 2)], f"{hint}_rounding")],
                         f"{hint}_numerator")
    q = ctx.node("Div", [numerator, total], f"{hint}_q")
    q = ctx.node("Min", [q, _const(ctx, f"{hint}_cap", 255)], f"{hint}_capped")
    return ctx.node("Cast", [q], hint, to=2)
