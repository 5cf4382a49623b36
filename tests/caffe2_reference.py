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
    t, l, b, r = pads
    padded = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=fill)
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
        [np.einsum("nhwcij,mijc->nhwm", win[:, :, :, g * cg:(g + 1) * cg], wc[g * mg:(g + 1) * mg]) for g in range(group)],
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
