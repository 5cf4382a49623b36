"""Caffe2 NetDef files: binary (`.pb`) and text (`.pbtxt`) reading and writing.

The message classes come from pipeline/proto/caffe2.proto, built at run time by `pipeline.proto`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import DecodeError

from pipeline.errors import UserError
from pipeline.proto import load_messages

TEXT_SUFFIXES = {".pbtxt", ".prototxt", ".txt"}


def message_class(name: str) -> Any:
    """The message class `caffe2.<name>` (e.g. "NetDef", "OperatorDef", "TensorProtos")."""
    return load_messages("caffe2.proto")[f"caffe2.{name}"]


class Caffe2FileError(UserError):
    """A Caffe2 protobuf file that cannot be read as the expected message."""


def is_text_path(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def load_net(path: str | Path) -> Any:
    """Read a NetDef from a binary `.pb` or a text `.pbtxt` file."""
    path = Path(path)
    if not path.is_file():
        raise Caffe2FileError(f"{path}: no such file")
    net = message_class("NetDef")()
    data = path.read_bytes()
    try:
        if is_text_path(path):
            # Fields of caffe2.proto outside the bundled subset (partition_info, qtensors)
            # carry nothing the importer uses.
            text_format.Parse(data.decode("utf-8"), net, allow_unknown_field=True)
        else:
            net.ParseFromString(data)
    except (DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        kind = "text" if is_text_path(path) else "binary"
        raise Caffe2FileError(f"{path}: not a Caffe2 NetDef in {kind} protobuf format ({exc})") from exc
    return net


def save_net(net: Any, path: str | Path) -> None:
    """Write a NetDef as binary, or as text when the suffix is `.pbtxt`."""
    path = Path(path)
    if is_text_path(path):
        path.write_text(text_format.MessageToString(net))
    else:
        path.write_bytes(net.SerializeToString())
