"""Write Caffe2 NetDefs from Python: operators, arguments and the int8 fills.

Used by the tests and by `testkit.caffe2_synthetic` to produce Caffe2 files with the
same operators and arguments as Caffe2's own quantised exports.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from pipeline.caffe2.proto import message_class


def make_arg(name: str, value: Any) -> Any:
    """A caffe2.Argument, typed the way Caffe2's python `utils.MakeArgument` types it."""
    arg = message_class("Argument")(name=name)
    if isinstance(value, (bool, int, np.integer)):
        arg.i = int(value)
    elif isinstance(value, (float, np.floating)):
        arg.f = float(value)
    elif isinstance(value, str):
        arg.s = value.encode("utf-8")
    elif isinstance(value, bytes):
        arg.s = value
    elif isinstance(value, (list, tuple, np.ndarray)):
        values = list(np.asarray(value).reshape(-1).tolist())
        if all(isinstance(v, int) for v in values):
            arg.ints.extend(values)
        else:
            arg.floats.extend(float(v) for v in values)
    else:
        raise TypeError(f"argument {name}: unsupported value type {type(value).__name__}")
    return arg


def make_op(op_type: str, inputs: Iterable[str], outputs: Iterable[str], engine: str = "", name: str = "",
            **args: Any) -> Any:
    """A caffe2.OperatorDef; keyword arguments become its `arg`s."""
    op = message_class("OperatorDef")(type=op_type, input=list(inputs), output=list(outputs), name=name)
    if engine:
        op.engine = engine
    op.arg.extend(make_arg(key, value) for key, value in args.items())
    return op


def int8_fill(blob: str, values: np.ndarray, scale: float, zero_point: int) -> Any:
    """Int8GivenTensorFill: uint8 values (the `values` string), shape, Y_scale, Y_zero_point."""
    values = np.asarray(values, dtype=np.uint8)
    return make_op("Int8GivenTensorFill", [], [blob], values=values.tobytes(), shape=list(values.shape),
                   Y_scale=float(scale), Y_zero_point=int(zero_point))


def int32_fill(blob: str, values: np.ndarray, scale: float) -> Any:
    """Int8GivenIntTensorFill for an int32 bias (zero point 0)."""
    values = np.asarray(values, dtype=np.int32)
    return make_op("Int8GivenIntTensorFill", [], [blob], values=values.reshape(-1).tolist(),
                   shape=list(values.shape), Y_scale=float(scale), Y_zero_point=0)


def make_net(name: str, ops: Iterable[Any], external_input: Iterable[str] = (),
             external_output: Iterable[str] = ()) -> Any:
    net = message_class("NetDef")(name=name)
    net.op.extend(ops)
    net.external_input.extend(external_input)
    net.external_output.extend(external_output)
    return net
