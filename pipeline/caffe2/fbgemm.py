"""DNNLOWP's (fbgemm-era Caffe2 server engine) int8 sum of two tensors, as ONNX operators.

DNNLOWP's `Sum`/`Int8Sum(Relu)` (elementwise_sum_dnnlowp_op_avx2.cc) computes, in float32
fused multiply-adds: t = a * a_scale + (-a_zp * a_scale - b_zp * b_scale); acc = b * b_scale + t;
y = acc * float(1.0 / y_scale) + y_zp, rounded half to even. onnxruntime's QLinearAdd orders
the same arithmetic differently and lands one step away on about 1 output in 50,000. ONNX has
no fused multiply-add: each one is computed in float64 (exact for these operands) and rounded
once to float32, which is what the fused instruction does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT, DOUBLE, UINT8 = 1, 11, 2  # TensorProto element types


def _fma(ctx: Any, x_double: str, multiplier: float, addend: str | float, hint: str) -> str:
    """float32(x * multiplier + addend) from float64 operands; the result is float64 again."""
    product = ctx.node("Mul", [x_double, ctx.initializer(f"{hint}_m", np.array(multiplier, np.float64))], f"{hint}_mul")
    if not isinstance(addend, str):
        addend = ctx.initializer(f"{hint}_c", np.array(addend, np.float64))
    rounded = ctx.node("Cast", [ctx.node("Add", [product, addend], f"{hint}_add")], f"{hint}_f32", to=FLOAT)
    return ctx.node("Cast", [rounded], f"{hint}_f64", to=DOUBLE)


def elementwise_sum(ctx: Any, a: str, a_qparams: tuple[float, int], b: str, b_qparams: tuple[float, int],
                    y_qparams: tuple[float, int], lo: int, hi: int, hint: str) -> str:
    (a_scale, a_zp), (b_scale, b_zp), (y_scale, y_zp) = a_qparams, b_qparams, y_qparams
    f32 = np.float32
    offset = float(f32(f32(-a_zp) * f32(a_scale)) - f32(f32(b_zp) * f32(b_scale)))
    a_d = ctx.node("Cast", [a], f"{hint}_a_f64", to=DOUBLE)
    b_d = ctx.node("Cast", [b], f"{hint}_b_f64", to=DOUBLE)
    t = _fma(ctx, a_d, float(f32(a_scale)), offset, f"{hint}_t")
    acc = _fma(ctx, b_d, float(f32(b_scale)), t, f"{hint}_acc")
    y = _fma(ctx, acc, float(f32(1.0 / float(f32(y_scale)))), float(y_zp), f"{hint}_y")
    rounded = ctx.node("Round", [y], f"{hint}_round")  # half to even, as _mm256_cvtps_epi32
    clamped = ctx.node("Clip", [rounded, ctx.initializer(f"{hint}_lo", np.array(lo, np.float64)),
                                ctx.initializer(f"{hint}_hi", np.array(hi, np.float64))], f"{hint}_clip")
    return ctx.node("Cast", [clamped], hint, to=UINT8)
