"""Protobuf message classes built at run time from the `.proto` files in this folder.

- `caffe.proto`: Caffe's `Datum` (LMDB image records, pipeline/sources/lmdb_records.py).
- `caffe2.proto`: Caffe2's `TensorProto(s)` (LMDB image records) and the `NetDef`, `OperatorDef`,
  `Argument` and `DeviceOption` of exported predictors (pipeline/caffe2/).

No `protoc` is needed: a small parser reads the proto2 subset these files use (package, messages,
nested enums and messages, `optional`/`required`/`repeated` scalar, enum and message fields with
`[packed = ...]`, `[default = ...]` and `[deprecated = ...]` options) into a `FileDescriptorProto`,
which the `protobuf` runtime turns into ordinary message classes. Each file gets its own
`DescriptorPool`, so these classes never clash with other copies of the same schema loaded
elsewhere in the process.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

PROTO_DIR = Path(__file__).resolve().parent

_Field = descriptor_pb2.FieldDescriptorProto
SCALAR_TYPES = {
    "double": _Field.TYPE_DOUBLE, "float": _Field.TYPE_FLOAT, "int64": _Field.TYPE_INT64,
    "uint64": _Field.TYPE_UINT64, "int32": _Field.TYPE_INT32, "fixed64": _Field.TYPE_FIXED64,
    "fixed32": _Field.TYPE_FIXED32, "bool": _Field.TYPE_BOOL, "string": _Field.TYPE_STRING,
    "bytes": _Field.TYPE_BYTES, "uint32": _Field.TYPE_UINT32, "sfixed32": _Field.TYPE_SFIXED32,
    "sfixed64": _Field.TYPE_SFIXED64, "sint32": _Field.TYPE_SINT32, "sint64": _Field.TYPE_SINT64,
}
LABELS = {"optional": _Field.LABEL_OPTIONAL, "required": _Field.LABEL_REQUIRED,
          "repeated": _Field.LABEL_REPEATED}
_TOKENS = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:[^"\\]|\\.)*"|[A-Za-z_][\w.]*|-?\d+(?:\.\d*)?(?:[eE]-?\d+)?|\S', re.S)


class ProtoSyntaxError(ValueError):
    """A .proto file outside the subset this parser reads; the message names file and token."""


class _Parser:
    def __init__(self, text: str, source: str):
        self.tokens = [t for t in _TOKENS.findall(text) if not t.startswith(("//", "/*"))]
        self.pos = 0
        self.source = source

    def peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if not token or (expected is not None and token != expected):
            wanted = repr(expected) if expected else "a token"
            got = repr(token) if token else "the end of the file"
            raise ProtoSyntaxError(f"{self.source}: expected {wanted}, got {got}")
        self.pos += 1
        return token

    def take_number(self) -> int:
        token = self.take()
        try:
            return int(token)
        except ValueError:
            raise ProtoSyntaxError(f"{self.source}: expected a number, got {token!r}") from None

    def parse_file(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        file = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto2")
        while self.peek():
            keyword = self.take()
            if keyword == "syntax":
                self.take("=")
                if self.take() != '"proto2"':
                    raise ProtoSyntaxError(f"{self.source}: only proto2 files are supported")
                self.take(";")
            elif keyword == "package":
                file.package = self.take()
                self.take(";")
            elif keyword == "message":
                self.parse_message(file.message_type.add())
            elif keyword == "enum":
                self.parse_enum(file.enum_type.add())
            elif keyword != ";":  # an empty statement
                raise ProtoSyntaxError(f"{self.source}: unsupported top-level statement {keyword!r}")
        return file

    def parse_message(self, message: descriptor_pb2.DescriptorProto) -> None:
        message.name = self.take()
        self.take("{")
        while self.peek() != "}":
            keyword = self.take()
            if keyword == "message":
                self.parse_message(message.nested_type.add())
            elif keyword == "enum":
                self.parse_enum(message.enum_type.add())
            elif keyword in LABELS:
                self.parse_field(message.field.add(), keyword)
            elif keyword != ";":  # an empty statement, as after a nested message's closing brace
                raise ProtoSyntaxError(f"{self.source}: unsupported statement {keyword!r} in message {message.name}")
        self.take("}")

    def parse_field(self, field: descriptor_pb2.FieldDescriptorProto, label: str) -> None:
        field.label = LABELS[label]
        type_name = self.take()
        if type_name in SCALAR_TYPES:
            field.type = SCALAR_TYPES[type_name]
        else:
            field.type_name = type_name  # resolved to a message or enum once the whole file is read
        field.name = self.take()
        self.take("=")
        field.number = self.take_number()
        if self.peek() == "[":
            self.take("[")
            while True:
                option, _, value = self.take(), self.take("="), self.take()
                if option == "packed":
                    field.options.packed = value == "true"
                elif option == "deprecated":
                    field.options.deprecated = value == "true"
                elif option == "default":
                    field.default_value = value.strip('"')
                else:
                    raise ProtoSyntaxError(f"{self.source}: unsupported field option {option!r} on {field.name}")
                if self.peek() == "]":
                    break
                self.take(",")
            self.take("]")
        self.take(";")

    def parse_enum(self, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enum.name = self.take()
        self.take("{")
        while self.peek() != "}":
            value = enum.value.add(name=self.take())
            self.take("=")
            value.number = self.take_number()
            self.take(";")
        self.take("}")


def _resolve_types(file: descriptor_pb2.FileDescriptorProto, source: str) -> None:
    """Turn each field's relative type name into a fully qualified message or enum reference,
    searching the enclosing scopes innermost first, as protoc does."""
    kinds: dict[str, int] = {}

    def collect(scope: str, messages, enums) -> None:
        for enum in enums:
            kinds[f"{scope}.{enum.name}"] = _Field.TYPE_ENUM
        for message in messages:
            kinds[f"{scope}.{message.name}"] = _Field.TYPE_MESSAGE
            collect(f"{scope}.{message.name}", message.nested_type, message.enum_type)

    root = f".{file.package}" if file.package else ""
    collect(root, file.message_type, file.enum_type)

    def resolve(scope: str, messages) -> None:
        for message in messages:
            inner = f"{scope}.{message.name}"
            for field in message.field:
                if field.type_name:
                    candidates = [f"{s}.{field.type_name}" for s in _scopes(inner)]
                    full = next((c for c in candidates if c in kinds), None)
                    if full is None:
                        raise ProtoSyntaxError(f"{source}: unknown type {field.type_name!r} in {inner[1:]}")
                    field.type_name, field.type = full, kinds[full]
            resolve(inner, message.nested_type)

    resolve(root, file.message_type)


def _scopes(scope: str) -> list[str]:
    """'.a.b.C' -> ['.a.b.C', '.a.b', '.a', '']."""
    parts = scope.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@functools.cache
def load_messages(proto_file: str) -> dict[str, type[Message]]:
    """Message classes of PROTO_FILE (a name in this folder or a path), by fully qualified name
    (e.g. "caffe.Datum", "caffe2.TensorProto")."""
    path = Path(proto_file) if Path(proto_file).is_absolute() else PROTO_DIR / proto_file
    parser = _Parser(path.read_text(encoding="utf-8"), str(path))
    file = parser.parse_file(path.name)
    _resolve_types(file, str(path))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    prefix = f"{file.package}." if file.package else ""
    names: list[str] = []

    def collect(scope: str, messages) -> None:
        for message in messages:
            names.append(f"{scope}{message.name}")
            collect(f"{scope}{message.name}.", message.nested_type)

    collect(prefix, file.message_type)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in names}
