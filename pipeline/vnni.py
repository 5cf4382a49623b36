"""Names the u8s8 saturation risk of an int8 model on a CPU without VNNI.

onnxruntime multiplies uint8 activations by int8 weights (its u8s8 kernels). On x86 CPUs with
AVX2 but without VNNI those kernels add pairs of products in 16 bits (vpmaddubsw), which
saturates when weights use the full int8 range: 2 x 255 x 127 > 32767. onnxruntime's
quantisation guide gives the remedies: weights in 7 bits (reduce_range) or uint8 weights
(U8U8). This module only detects the case; it changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


CPUINFO = Path("/proc/cpuinfo")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}
# Weight inputs of the operators onnxruntime runs with u8s8 kernels (QDQ weights feed DequantizeLinear).
WEIGHT_INPUTS = {"QLinearConv": 3, "QLinearMatMul": 3, "DequantizeLinear": 0, "MatMulInteger": 1, "ConvInteger": 1}
SEVEN_BIT = (-64, 63)  # reduce_range weights stay inside; anything outside uses the full int8 range


def cpu_flags(cpuinfo: Path = CPUINFO) -> Optional[set[str]]:
    """The first processor's feature flags, or None where /proc/cpuinfo is unreadable or not x86."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def full_range_s8_weights(model_path: str | os.PathLike) -> bool:
    """Whether any int8 weight of the ONNX model lies outside the 7-bit range."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    int8 = {init.name: init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
    for node in model.graph.node:
        position = WEIGHT_INPUTS.get(node.op_type)
        if position is not None and len(node.input) > position and node.input[position] in int8:
            values = numpy_helper.to_array(int8[node.input[position]])
            if values.size and (values.min() < SEVEN_BIT[0] or values.max() > SEVEN_BIT[1]):
                return True
    return False


def u8s8_saturation_warning(model_path: str | os.PathLike, cpuinfo: Path = CPUINFO) -> Optional[str]:
    """One warning line when this CPU lacks VNNI and the model has full-range int8 weights, else None."""
    flags = cpu_flags(cpuinfo)
    if flags is None or "avx2" not in flags or flags & VNNI_FLAGS:
        return None
    if not full_range_s8_weights(model_path):
        return None
    return (f"warning: {Path(model_path).name} has full-range int8 weights and this CPU has AVX2 without VNNI: "
            "onnxruntime's u8s8 kernels can saturate and move some outputs (see docs/caffe2.md)")


def warn_u8s8_saturation(model_path: str | os.PathLike) -> None:
    """Print u8s8_saturation_warning on stderr, if there is one."""
    import typer

    message = u8s8_saturation_warning(model_path)
    if message:
        typer.secho(message, err=True, fg=typer.colors.YELLOW)
