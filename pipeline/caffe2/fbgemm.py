"""DNNLOWP's (the fbgemm-era Caffe2 server engine's) int8 sum of two tensors.

DNNLOWP's `Sum`/`Int8Sum(Relu)` (elementwise_sum_dnnlowp_op_avx2.cc) computes, in float32
fused multiply-adds: t = a * a_scale + (-a_zp * a_scale - b_zp * b_scale); acc = b * b_scale + t;
y = acc * float(1.0 / y_scale) + y_zp, rounded half to even and clamped. onnxruntime's
QLinearAdd orders the same arithmetic differently and lands one step away on about 1 output in
50,000. The output depends only on the two uint8 inputs, so the import evaluates it once for
all 65,536 pairs and the graph looks the result up.
"""

from __future__ import annotations

import numpy as np


def _fma32(x: np.ndarray, multiplier: float, addend: np.ndarray | float) -> np.ndarray:
    """float32(x * multiplier + addend) rounded once, as the fused instruction does: the exact
    value is formed in float64 (the products of these operands fit its 53 bits)."""
    scaled = x.astype(np.float64) * np.float64(np.float32(multiplier))
    return (scaled + np.asarray(addend, np.float64)).astype(np.float32)


def sum_table(a_qparams: tuple[float, int], b_qparams: tuple[float, int], y_qparams: tuple[float, int],
              lo: int, hi: int) -> np.ndarray:
    """uint8 result for every (a, b), at index a * 256 + b."""
    (a_scale, a_zp), (b_scale, b_zp), (y_scale, y_zp) = a_qparams, b_qparams, y_qparams
    f32 = np.float32
    a, b = np.divmod(np.arange(256 * 256), 256)
    t = _fma32(a, a_scale, f32(f32(-a_zp) * f32(a_scale)) - f32(f32(b_zp) * f32(b_scale)))
    acc = _fma32(b, b_scale, t)
    y = _fma32(acc, float(f32(1.0 / float(f32(y_scale)))), float(y_zp))
    return np.clip(np.rint(y), lo, hi).astype(np.uint8)  # rint: half to even, as _mm256_cvtps_epi32
