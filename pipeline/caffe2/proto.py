"""Caffe2 protobuf messages built at run time from the bundled `caffe2.proto`.

No protoc and no generated `_pb2` module: a small parser turns the proto2 subset in
`caffe2.proto` into a `FileDescriptorProto`, and the `protobuf` package builds the message
classes from it. `load_net` / `save_net` read and write NetDefs in binary (`.pb`) and
text (`.pbtxt`) form.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

SCHEMA_PATH = Path(__file__).with_name("caffe2.proto")
TEXT_SUFFIXES = {".pbtxt", ".prototxt", ".txt"}

_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALAR_TYPES = {
    "double": _FIELD.TYPE_DOUBLE,
    "float": _FIELD.TYPE_FLOAT,
    "int64": _FIELD.TYPE_INT64,
    "uint64": _FIELD.TYPE_UINT64,
    "int32": _FIELD.TYPE_INT32,
    "uint32": _FIELD.TYPE_UINT32,
    "bool": _FIELD.TYPE_BOOL,
    "string": _FIELD.TYPE_STRING,
    "bytes": _FIELD.TYPE_BYTES,
}
_LABELS = {
    "optional": _FIELD.LABEL_OPTIONAL,
    "repeated": _FIELD.LABEL_REPEATED,
    "required": _FIELD.LABEL_REQUIRED,
}
_TOKEN = re.compile(r'\s*(//[^\n]*|"(?:[^"\\]|\\.)*"|[A-Za-z_][\w.]*|-?\d+|[{}=;\[\],])')


class ProtoSchemaError(ValueError):
    """The bundled .proto text uses syntax the small parser does not handle."""


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].strip():
                raise ProtoSchemaError(f"cannot parse {SCHEMA_PATH.name} near {text[pos:pos + 40]!r}")
            break
        pos = match.end()
        if not match.group(1).startswith("//"):
            tokens.append(match.group(1))
    return tokens


class _Parser:
    """Recursive-descent parser for messages, enums and fields of a proto2 file."""

    def __init__(self, text: str):
        self.tokens = _tokens(text)
        self.pos = 0

    def next(self) -> str:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, wanted: str) -> None:
        token = self.next()
        if token != wanted:
            raise ProtoSchemaError(f"expected {wanted!r}, found {token!r} in {SCHEMA_PATH.name}")

    def parse_file(self) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name="caffe2_subset.proto", syntax="proto2")
        while self.pos < len(self.tokens):
            keyword = self.next()
            if keyword == "syntax":
                self.expect("=")
                self.next()
                self.expect(";")
            elif keyword == "package":
                fdp.package = self.next()
                self.expect(";")
            elif keyword == "message":
                self.parse_message(fdp.message_type.add())
            elif keyword == "enum":
                self.parse_enum(fdp.enum_type.add())
            else:
                raise ProtoSchemaError(f"unexpected {keyword!r} at top level of {SCHEMA_PATH.name}")
        return fdp

    def parse_enum(self, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enum.name = self.next()
        self.expect("{")
        while (name := self.next()) != "}":
            self.expect("=")
            enum.value.add(name=name, number=int(self.next()))
            self.expect(";")

    def parse_message(self, msg: descriptor_pb2.DescriptorProto) -> None:
        msg.name = self.next()
        self.expect("{")
        while (token := self.next()) != "}":
            if token == "message":
                self.parse_message(msg.nested_type.add())
            elif token == "enum":
                self.parse_enum(msg.enum_type.add())
            elif token in _LABELS:
                self.parse_field(msg.field.add(), token)
            elif token == ";":
                continue
            else:
                raise ProtoSchemaError(f"unexpected {token!r} in message {msg.name}")

    def parse_field(self, field: descriptor_pb2.FieldDescriptorProto, label: str) -> None:
        type_name = self.next()
        field.name = self.next()
        self.expect("=")
        field.number = int(self.next())
        field.label = _LABELS[label]
        if type_name in _SCALAR_TYPES:
            field.type = _SCALAR_TYPES[type_name]
        else:
            # Message or enum: resolved after the whole file is read (see _resolve_types).
            field.type_name = type_name
        token = self.next()
        if token == "[":
            while True:
                option = self.next()
                self.expect("=")
                value = self.next()
                if option == "default":
                    field.default_value = value.strip('"')
                elif option == "packed":
                    field.options.packed = value == "true"
                elif option != "deprecated":
                    raise ProtoSchemaError(f"unsupported field option {option!r} on {field.name}")
                token = self.next()
                if token == "]":
                    break
                if token != ",":
                    raise ProtoSchemaError(f"expected ',' or ']' after option on {field.name}")
            token = self.next()
        if token != ";":
            raise ProtoSchemaError(f"expected ';' after field {field.name}")


def _resolve_types(fdp: descriptor_pb2.FileDescriptorProto) -> None:
    """Give every message/enum field its fully qualified type name and its kind."""
    enums: set[str] = set()
    messages: set[str] = set()

    def collect(prefix: str, msg: descriptor_pb2.DescriptorProto) -> None:
        full = f"{prefix}.{msg.name}"
        messages.add(full)
        enums.update(f"{full}.{e.name}" for e in msg.enum_type)
        for nested in msg.nested_type:
            collect(full, nested)

    package = f".{fdp.package}"
    enums.update(f"{package}.{e.name}" for e in fdp.enum_type)
    for msg in fdp.message_type:
        collect(package, msg)

    def resolve(scope: str, msg: descriptor_pb2.DescriptorProto) -> None:
        full = f"{scope}.{msg.name}"
        for field in msg.field:
            if not field.type_name:
                continue
            # Protobuf scoping: innermost enclosing scope first, then outwards.
            parts = full.split(".")
            for depth in range(len(parts), 0, -1):
                candidate = ".".join(parts[:depth] + [field.type_name])
                if candidate in messages or candidate in enums:
                    break
            else:
                raise ProtoSchemaError(f"unknown type {field.type_name!r} of field {msg.name}.{field.name}")
            field.type_name = candidate
            field.type = _FIELD.TYPE_ENUM if candidate in enums else _FIELD.TYPE_MESSAGE
        for nested in msg.nested_type:
            resolve(full, nested)

    for msg in fdp.message_type:
        resolve(package, msg)


@lru_cache(maxsize=1)
def _message_classes() -> dict[str, Any]:
    fdp = _Parser(SCHEMA_PATH.read_text()).parse_file()
    _resolve_types(fdp)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        msg.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fdp.package}.{msg.name}"))
        for msg in fdp.message_type
    }


def message_class(name: str) -> Any:
    """The message class `caffe2.<name>` (e.g. "NetDef", "OperatorDef", "TensorProtos")."""
    return _message_classes()[name]


class Caffe2FileError(ValueError):
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
