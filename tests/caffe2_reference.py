"""Caffe2's int8 arithmetic written directly in numpy, in Caffe2's own NHWC layout, and the score
of DNNLOWP's L2 range search (`caffe2_l2_norms`).

Independent of the importer: weights are [M, kH, kW, C/group] uint8 with their zero point,
biases int32 at scale x_scale * w_scale, outputs requantised to (Y_scale, Y_zero_point)
with round-to-nearest and clamped to uint8, padding of max pooling ignored and average
pooling dividing by the number of non-padding elements.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    q = np.rint(x.astype(np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, 0, 255).astype(np.uint8)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


def requantize(acc: np.ndarray, multiplier: float, zero_point: int, relu: bool = False) -> np.ndarray:
    q = np.rint(acc.astype(np.float64) * multiplier) + zero_point
    return np.clip(q, zero_point if relu else 0, 255).astype(np.uint8)


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: int, pads: tuple[int, int, int, int],
             fill: int, dilation: int = 1) -> np.ndarray:
    """[N, Ho, Wo, C, kH, kW] windows of an NHWC tensor padded with `fill`."""
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    span = ((kernel[0] - 1) * dilation + 1, (kernel[1] - 1) * dilation + 1)
    win = sliding_window_view(padded, span, axis=(1, 2))[:, ::stride, ::stride]
    return win[..., ::dilation, ::dilation]


def conv_nhwc(x: np.ndarray, x_scale: float, x_zp: int, w: np.ndarray, w_scale: float, w_zp: int,
              bias: np.ndarray | None, y_scale: float, y_zp: int, stride: int = 1,
              pads: tuple[int, int, int, int] = (0, 0, 0, 0), group: int = 1, dilation: int = 1,
              relu: bool = False) -> np.ndarray:
    m, kh, kw, cg = w.shape
    # Padding holds real 0, i.e. the input zero point.
    win = _windows(x.astype(np.int64) - x_zp, (kh, kw), stride, pads, 0, dilation)
    wc = w.astype(np.int64) - w_zp
    mg = m // group
    acc = np.concatenate(
        [np.einsum("nhwcij,mijc->nhwm", win[:, :, :, g * cg:(g + 1) * cg], wc[g * mg:(g + 1) * mg])
         for g in range(group)],
        axis=-1,
    )
    if bias is not None:
        acc = acc + bias.astype(np.int64)
    return requantize(acc, x_scale * w_scale / y_scale, y_zp, relu)


def fc(x: np.ndarray, x_scale: float, x_zp: int, w: np.ndarray, w_scale: float, w_zp: int, bias: np.ndarray,
       y_scale: float, y_zp: int) -> np.ndarray:
    acc = (x.reshape(len(x), -1).astype(np.int64) - x_zp) @ (w.astype(np.int64) - w_zp).T + bias
    return requantize(acc, x_scale * w_scale / y_scale, y_zp)


def add(a: np.ndarray, a_scale: float, a_zp: int, b: np.ndarray, b_scale: float, b_zp: int, y_scale: float,
        y_zp: int, relu: bool = False) -> np.ndarray:
    real = (a.astype(np.float64) - a_zp) * a_scale + (b.astype(np.float64) - b_zp) * b_scale
    return requantize(real, 1.0 / y_scale, y_zp, relu)


def max_pool_nhwc(x: np.ndarray, kernel: int, stride: int, pads: tuple[int, int, int, int]) -> np.ndarray:
    return _windows(x.astype(np.int32), (kernel, kernel), stride, pads, -1).max(axis=(-2, -1)).astype(np.uint8)


def average_pool_nhwc(x: np.ndarray, x_scale: float, x_zp: int, kernel: int, stride: int,
                      pads: tuple[int, int, int, int], y_scale: float, y_zp: int) -> np.ndarray:
    values = _windows(x.astype(np.int64) - x_zp, (kernel, kernel), stride, pads, 0)
    counts = _windows(np.ones(x.shape[:3] + (1,), np.int64), (kernel, kernel), stride, pads, 0).sum(axis=(-2, -1))
    mean = values.sum(axis=(-2, -1)) / counts
    return requantize(mean, x_scale / y_scale, y_zp)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def caffe2_l2_norms(counts: np.ndarray, width: float, start_bin: np.ndarray, nbins_selected: np.ndarray) -> np.ndarray:
    """The score Caffe2 DNNLOWP's brute-force L2 search (norm_minimization.cc) gives each candidate
    range [start_bin, start_bin + nbins_selected) of a histogram: values uniform inside each bin,
    each one measured to the centre of its destination bin among 256 equal bins over the range,
    values outside measured to the outermost centres. Written from its definition: the integral
    of the squared distance to the nearest clamped centre, through its antiderivative at every edge."""
    step = width * nbins_selected[:, None] / 256
    span = 256 * step
    x = (np.arange(counts.size + 1)[None, :] - start_bin[:, None]) * width  # edges from the range start
    inside = np.clip(x, 0, span)
    u = inside / step
    whole = np.minimum(np.floor(u), 255)
    antiderivative = step**3 * (whole / 12 + ((u - whole - 0.5) ** 3 + 0.125) / 3)
    below, above = np.minimum(x, 0), np.maximum(x - span, 0)
    antiderivative += ((below - step / 2) ** 3 + (step / 2) ** 3) / 3
    antiderivative += ((above + step / 2) ** 3 - (step / 2) ** 3) / 3
    return (np.diff(antiderivative, axis=1) * counts / width).sum(axis=1)


# -- whole nets, per engine ------------------------------------------------------------
#
# `run_net` executes a Caffe2 int8 predict net in NHWC with the arithmetic of the engine
# each operator names: DNNLOWP (fbgemm: float32 requantisation, round half to even) or
# Caffe2's default QNNPACK operators (fixed-point multipliers and rounding shifts, written
# here the way QNNPACK's scalar reference code states them, C integer semantics included).

DNNLOWP_ENGINES = ("DNNLOWP", "DNNLOWP_16", "DNNLOWP_ACC16")


def _f32_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def _asr(x: np.ndarray, shift: int) -> np.ndarray:
    return x >> shift  # numpy's >> on signed integers is arithmetic, like asr_s32/asr_s64


def qnnpack_q31_requantize(acc: np.ndarray, scale: float, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """qnnp_q31_requantize: Q31 multiply rounding half up, then a remainder-corrected shift."""
    bits = _f32_bits(scale)
    multiplier = ((bits & 0x007FFFFF) | 0x00800000) << 7
    shift = 127 + 31 - 32 - (bits >> 23)
    mask, threshold = (1 << shift) - 1, ((1 << shift) - 1) >> 1
    n = acc.astype(np.int64)
    q31 = _asr(n * multiplier + (1 << 30), 31)
    remainder = (q31 & mask) - (n < 0)
    out = _asr(q31, shift) + (remainder > threshold)
    return (np.clip(out, lo - zero_point, hi - zero_point) + zero_point).astype(np.uint8)


def qnnpack_add(a: np.ndarray, a_scale: float, a_zp: int, b: np.ndarray, b_scale: float, b_zp: int,
                y_scale: float, y_zp: int, lo: int, hi: int) -> np.ndarray:
    """qnnp_add_quantize with the multipliers of qnnp_compute_scalar_add_quantization_params."""
    a_out = np.float32(a_scale) / np.float32(y_scale)
    b_out = np.float32(b_scale) / np.float32(y_scale)
    shift = 21 - ((_f32_bits(max(a_out, b_out)) >> 23) - 127)
    a_mult = int(np.rint(np.array(_f32_bits(a_out) + (shift << 23), np.uint32).view(np.float32)))
    b_mult = int(np.rint(np.array(_f32_bits(b_out) + (shift << 23), np.uint32).view(np.float32)))
    mask, threshold = (1 << shift) - 1, ((1 << shift) - 1) >> 1
    acc = -(a_mult * a_zp + b_mult * b_zp) + a.astype(np.int64) * a_mult + b.astype(np.int64) * b_mult
    remainder = (acc & mask) - (acc < 0)
    acc = _asr(acc, shift) + (remainder > threshold)
    return np.clip(acc + y_zp, lo, hi).astype(np.uint8)


def qnnpack_average_pool(window_sum: np.ndarray, count: int, x_scale: float, x_zp: int, y_scale: float,
                         y_zp: int) -> np.ndarray:
    """qnnp_avgpool_quantize: bias -count*zp, a 24-bit multiplier and a 64-bit rounding shift."""
    scale = np.float32(x_scale) / (np.float32(y_scale) * np.float32(count))
    bits = _f32_bits(scale)
    multiplier, shift = (bits & 0x007FFFFF) | 0x00800000, 127 + 23 - (bits >> 23)
    acc = window_sum.astype(np.int64) - count * x_zp
    n = _asr(acc * multiplier - (acc < 0) + (1 << (shift - 1)), shift)
    return (np.clip(n, -y_zp, 255 - y_zp) + y_zp).astype(np.uint8)


def qnnpack_softargmax(x: np.ndarray, x_scale: float) -> np.ndarray:
    """QNNPACK's softargmax on [N, C] uint8: exp table from the row maximum, normalised to 1/256."""
    channels = x.shape[1]
    qscale = min(float(np.iinfo(np.uint32).max) / channels, 8388607.0)
    table = np.array([np.rint(qscale * np.exp((i - 255) * float(np.float32(x_scale)))) for i in range(256)],
                     np.int64)
    t = table[x.astype(np.int64) + 255 - x.max(axis=1, keepdims=True).astype(np.int64)]
    total = t.sum(axis=1, keepdims=True)
    return np.minimum((t * 256 + total // 2) // total, 255).astype(np.uint8)


def fbgemm_requantize(acc: np.ndarray, x_scale: float, w_scale: float, y_scale: float, zero_point: int,
                      lo: int, hi: int) -> np.ndarray:
    """fbgemm's requantisation: float32 multiplier x_scale * w_scale / y_scale, round half to even."""
    multiplier = np.float32(np.float32(x_scale) * np.float32(w_scale)) / np.float32(y_scale)
    q = np.rint(acc.astype(np.float32) * multiplier).astype(np.int64) + zero_point
    return np.clip(q, lo, hi).astype(np.uint8)


def _fma32(a: np.ndarray, b: float, c: np.ndarray | float) -> np.ndarray:
    """A float32 fused multiply-add: the exact a * b + c rounded once (float64 holds it exactly here)."""
    return (a.astype(np.float64) * np.float64(np.float32(b)) + np.asarray(c, np.float64)).astype(np.float32)


def fbgemm_sum(a: np.ndarray, a_scale: float, a_zp: int, b: np.ndarray, b_scale: float, b_zp: int, y_scale: float,
               y_zp: int, lo: int, hi: int) -> np.ndarray:
    """DNNLOWP's AVX2 ElementWiseSum: three float32 FMAs, then round half to even and clamp."""
    f32 = np.float32
    t = _fma32(a, a_scale, f32(-a_zp) * f32(a_scale) - f32(b_zp) * f32(b_scale))
    acc = _fma32(b, b_scale, t)
    y = _fma32(acc, f32(1.0 / float(f32(y_scale))), float(y_zp))
    return np.clip(np.rint(y), lo, hi).astype(np.uint8)


def int_conv_nhwc(x: np.ndarray, x_zp: int, w: np.ndarray, w_zp: int, bias: np.ndarray, stride: int,
                  pad: int, group: int) -> np.ndarray:
    """The int32 accumulator of a convolution in NHWC (exact: float64 holds every partial sum)."""
    m, kh, kw, cg = w.shape
    win = _windows(x.astype(np.float64) - x_zp, (kh, kw), stride, (pad,) * 4, 0)  # [N, Ho, Wo, C, kh, kw]
    n, ho, wo = win.shape[:3]
    wc = w.astype(np.float64) - w_zp
    if group == 1:
        cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * cg)
        acc = cols @ wc.reshape(m, -1).T
    elif cg == 1 and group == m:  # depthwise
        acc = np.einsum("nhwcij,cij->nhwc", win, wc[..., 0], optimize=True).reshape(n * ho * wo, m)
    else:
        raise NotImplementedError("grouped convolution other than depthwise")
    return (acc.reshape(n, ho, wo, m) + bias).astype(np.int64)


def run_net(constants: dict, predict_net, image_nchw: np.ndarray,
            forced: dict[int, np.ndarray] | None = None) -> tuple[list[tuple[int, str, np.ndarray]], dict]:
    """(every operator's uint8 output as (index, blob, NHWC array), the final blob table).

    `forced` maps operator indices to the values the model under test produced: after
    computing an operator's output the reference continues from that value, so that each
    operator is checked on its own inputs."""
    blobs: dict[str, tuple[np.ndarray, float | None, int | None]] = {
        predict_net.external_input[0]: (image_nchw, None, None)}
    outputs = []
    for index, op in enumerate(predict_net.op):
        args = {a.name: (a.i if a.HasField("i") else a.f if a.HasField("f") else a.s.decode()) for a in op.arg}
        y_scale, y_zp = args.get("Y_scale"), int(args.get("Y_zero_point", 0))
        fbgemm = op.engine in DNNLOWP_ENGINES
        relu = op.type.endswith("Relu")
        lo = y_zp if relu else 0
        x, x_scale, x_zp = blobs[op.input[0]] if op.input else (None, None, None)
        if op.type == "NCHW2NHWC":
            y = (x.transpose(0, 2, 3, 1), None, None)
        elif op.type == "Int8Quantize":
            y = (quantize(x, y_scale, y_zp), y_scale, y_zp)
        elif op.type in ("Int8Conv", "Int8ConvRelu", "Int8FC"):
            w, b = constants[op.input[1]], constants[op.input[2]]
            if op.type == "Int8FC":
                acc = x.reshape(len(x), -1).astype(np.int64) - x_zp
                acc = acc @ (w.values.astype(np.int64) - w.zero_point).T + b.values
            else:
                acc = int_conv_nhwc(x, x_zp, w.values, w.zero_point, b.values, int(args.get("stride", 1)),
                                    int(args.get("pad", 0)), int(args.get("group", 1)))
            if fbgemm:
                q = fbgemm_requantize(acc, x_scale, w.scale, y_scale, y_zp, lo, 255)
            else:
                scale = float(np.float32(np.float32(x_scale) * np.float32(w.scale)) / np.float32(y_scale))
                q = qnnpack_q31_requantize(acc, scale, y_zp, lo, 255)
            y = (q, y_scale, y_zp)
        elif op.type == "Int8MaxPool":
            pad = int(args.get("pad", 0))
            y = (max_pool_nhwc(x, int(args["kernel"]), int(args.get("stride", 1)), (pad,) * 4), x_scale, x_zp)
        elif op.type in ("Int8Sum", "Int8SumRelu"):
            b, b_scale, b_zp = blobs[op.input[1]]
            if fbgemm:
                q = fbgemm_sum(x, x_scale, x_zp, b, b_scale, b_zp, y_scale, y_zp, lo, 255)
            else:
                q = qnnpack_add(x, x_scale, x_zp, b, b_scale, b_zp, y_scale, y_zp, lo, 255)
            y = (q, y_scale, y_zp)
        elif op.type == "Int8Relu":
            y = (np.maximum(x, x_zp), x_scale, x_zp)
        elif op.type == "Int8AveragePool":
            kernel = int(args["kernel"])
            window_sum = _windows(x.astype(np.int64), (kernel, kernel), int(args.get("stride", 1)), (0,) * 4,
                                  0).sum(axis=(-2, -1))
            if fbgemm:
                mean = (window_sum - kernel * kernel * x_zp).astype(np.float32) / np.float32(kernel * kernel)
                q = np.clip(np.rint(mean * np.float32(x_scale) / np.float32(y_scale)).astype(np.int64) + y_zp, 0, 255)
                q = q.astype(np.uint8)
            else:
                q = qnnpack_average_pool(window_sum, kernel * kernel, x_scale, x_zp, y_scale, y_zp)
            y = (q, y_scale, y_zp)
        elif op.type == "Int8Softmax":
            y = (qnnpack_softargmax(x, x_scale), y_scale, y_zp)
        elif op.type == "Int8Dequantize":
            y = (dequantize(x, x_scale, x_zp), None, None)
        elif op.type == "Softmax":
            y = (softmax(x), None, None)
        else:
            raise NotImplementedError(op.type)
        if y[0].dtype == np.uint8:
            outputs.append((index, op.output[0], y[0]))
            if forced is not None:
                y = (forced[index], y[1], y[2])
        blobs[op.output[0]] = y
    return outputs, blobs
