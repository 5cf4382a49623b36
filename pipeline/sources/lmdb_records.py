"""Caffe `Datum` and Caffe2 `TensorProtos` records: bytes <-> source-row fields.

The message classes come from pipeline/proto/caffe.proto and caffe2.proto. Decoding follows what
Caffe2's `ImageInputOp` (caffe2/image/image_input_op.h) did with each record:

- Datum, `encoded` true: `data` is an image file (JPEG, PNG, ...).
- Datum, raw: `data` is uint8 pixels in CHW order, BGR for 3 channels (Caffe read images with
  OpenCV); 1 or 3 channels.
- TensorProtos: protos[0] is the image, data_type STRING with one encoded image in `string_data`,
  or BYTE with raw pixels in `byte_data` and dims (H, W) or (H, W, C). Caffe2 copied those bytes
  straight into an OpenCV `CV_8UC3` matrix and from then on treated it like an `imdecode` result,
  so raw HWC records are BGR, as Caffe2's writers (which read images with OpenCV) stored them.
  protos[1] is the label (INT32, or a FLOAT holding a whole number); an optional protos[2] is an
  INT32 bounding box (ymin, xmin, height, width) to crop to before scaling.

Raw pixels are handed on in the source-row contract's form: HWC, RGB (or greyscale).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from pipeline.proto import load_messages
from pipeline.sources.base import NO_LABEL

DATUM = "datum"
TENSOR_PROTOS = "caffe2"
RECORD_KINDS = (DATUM, TENSOR_PROTOS)
KIND_NAMES = {DATUM: "Caffe Datum", TENSOR_PROTOS: "Caffe2 TensorProtos"}


class RecordError(ValueError):
    """A record that is not a usable image record of its kind; the message says why."""


class ImageRecord(NamedTuple):
    """One decoded record, in the source-row contract's terms (see pipeline/sources/__init__.py)."""

    label: int
    image: bytes
    raw_height: int = 0
    raw_width: int = 0
    raw_channels: int = 0
    bbox_ymin: int = 0
    bbox_xmin: int = 0
    bbox_height: int = 0
    bbox_width: int = 0


def datum_class() -> type[Message]:
    return load_messages("caffe.proto")["caffe.Datum"]


def tensor_proto_classes() -> tuple[type[Message], type[Message]]:
    """(TensorProto, TensorProtos)."""
    messages = load_messages("caffe2.proto")
    return messages["caffe2.TensorProto"], messages["caffe2.TensorProtos"]


def _parse(cls: type[Message], value: bytes) -> Message:
    message = cls()
    try:
        message.ParseFromString(value)
    except DecodeError:
        raise RecordError(f"not a {cls.DESCRIPTOR.full_name} message (malformed protobuf wire format)") from None
    unknown = sorted({field.field_number for field in UnknownFieldSet(message)})
    if unknown:
        # Another message's fields, or these fields with the wrong wire type: not this kind of record.
        raise RecordError(f"not a {cls.DESCRIPTOR.full_name} message (unknown field numbers {unknown})")
    return message


def _bgr_to_rgb(pixels: np.ndarray) -> bytes:
    """uint8 HWC pixels, BGR when 3 channels -> contract bytes (RGB HWC, or greyscale)."""
    if pixels.shape[2] == 3:
        pixels = pixels[:, :, ::-1]
    return np.ascontiguousarray(pixels).tobytes()


def _raw_shape(height: int, width: int, channels: int, size: int, what: str) -> None:
    if channels not in (1, 3):
        raise RecordError(f"{what}: {channels} channels; expected 1 or 3")
    if height <= 0 or width <= 0:
        raise RecordError(f"{what}: size {height}x{width} has no pixels")
    if size != height * width * channels:
        raise RecordError(f"{what}: {size} bytes of pixels for {height}x{width}x{channels}")


def decode_datum(value: bytes) -> ImageRecord:
    """A Caffe Datum record -> ImageRecord (raises RecordError)."""
    datum = _parse(datum_class(), value)
    label = datum.label if datum.HasField("label") else NO_LABEL
    if not datum.data:
        if len(datum.float_data):
            raise RecordError(f"Datum holds {len(datum.float_data)} float_data values instead of uint8 "
                              "pixels; float Datums (often mean-subtracted) are not supported")
        raise RecordError("Datum holds no image data")
    if datum.encoded:
        return ImageRecord(label, datum.data)
    channels, height, width = datum.channels, datum.height, datum.width
    _raw_shape(height, width, channels, len(datum.data), "raw Datum")
    chw = np.frombuffer(datum.data, dtype=np.uint8).reshape(channels, height, width)
    return ImageRecord(label, _bgr_to_rgb(chw.transpose(1, 2, 0)), height, width, channels)


def _tensor_label(tensor: Message, data_type) -> int:
    if tensor.data_type == data_type.INT32 and len(tensor.int32_data) == 1:
        return int(tensor.int32_data[0])
    if tensor.data_type == data_type.FLOAT and len(tensor.float_data) == 1:
        value = float(tensor.float_data[0])
        if not math.isfinite(value) or value != int(value):
            raise RecordError(f"label {value} is not a class index")
        return int(value)
    raise RecordError(f"label tensor (protos[1]) is {data_type.Name(tensor.data_type)} with "
                      f"{len(tensor.int32_data) + len(tensor.float_data)} values; expected one INT32 or FLOAT")


def decode_tensor_protos(value: bytes) -> ImageRecord:
    """A Caffe2 TensorProtos record -> ImageRecord (raises RecordError)."""
    tensor_proto, tensor_protos = tensor_proto_classes()
    data_type = tensor_proto.DataType
    protos = _parse(tensor_protos, value).protos
    if not 2 <= len(protos) <= 3:
        raise RecordError(f"TensorProtos with {len(protos)} tensors; expected image, label "
                          "and an optional bounding box")
    image, label_tensor = protos[0], protos[1]
    label = _tensor_label(label_tensor, data_type)
    box = (0, 0, 0, 0)
    if len(protos) == 3:
        box_tensor = protos[2]
        box = tuple(int(v) for v in box_tensor.int32_data)
        if box_tensor.data_type != data_type.INT32 or len(box) != 4:
            raise RecordError("bounding box tensor (protos[2]) is not 4 INT32 values (ymin, xmin, height, width)")
        if min(box[:2]) < 0 or min(box[2:]) <= 0:
            raise RecordError(f"bounding box (ymin, xmin, height, width) = {box} is not a box")
    if image.data_type == data_type.STRING:
        if len(image.string_data) != 1 or not image.string_data[0]:
            raise RecordError(f"image tensor is STRING with {len(image.string_data)} strings; "
                              "expected one encoded image")
        return ImageRecord(label, image.string_data[0], 0, 0, 0, *box)
    if image.data_type == data_type.BYTE:
        dims = [int(d) for d in image.dims]
        if len(dims) not in (2, 3):
            raise RecordError(f"raw image tensor has dims {dims}; expected (H, W) or (H, W, C)")
        height, width, channels = dims[0], dims[1], dims[2] if len(dims) == 3 else 1
        _raw_shape(height, width, channels, len(image.byte_data), "raw image tensor")
        hwc = np.frombuffer(image.byte_data, dtype=np.uint8).reshape(height, width, channels)
        return ImageRecord(label, _bgr_to_rgb(hwc), height, width, channels, *box)
    raise RecordError(f"image tensor (protos[0]) is {data_type.Name(image.data_type)}; expected "
                      "STRING (encoded image) or BYTE (raw pixels)")


DECODERS: dict[str, Callable[[bytes], ImageRecord]] = {
    DATUM: decode_datum,
    TENSOR_PROTOS: decode_tensor_protos,
}


def detect_record_kind(value: bytes) -> str:
    """DATUM or TENSOR_PROTOS for a record that decodes as one; RecordError saying why otherwise.

    The two cannot be confused: field 1 is a varint (`channels`) in a Datum and a length-delimited
    message (`protos`) in TensorProtos, and a field of the wrong wire type makes `_parse` refuse.
    """
    reasons = []
    for kind in RECORD_KINDS:
        try:
            DECODERS[kind](value)
            return kind
        except RecordError as exc:
            reasons.append(f"as {KIND_NAMES[kind]}: {exc}")
    raise RecordError("neither a Caffe Datum nor a Caffe2 TensorProtos record (" + "; ".join(reasons) + ")")


def encode_datum(label: int, *, encoded: bytes | None = None, bgr_hwc: np.ndarray | None = None) -> bytes:
    """A Datum as convert_imageset wrote it: an encoded image file, or raw pixels (given HWC BGR,
    stored CHW)."""
    datum = datum_class()(label=label)
    if encoded is not None:
        datum.data, datum.encoded = encoded, True
    else:
        height, width, channels = bgr_hwc.shape
        datum.channels, datum.height, datum.width = channels, height, width
        datum.data = np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1)).tobytes()
    return datum.SerializeToString()


def encode_tensor_protos(label: int, *, encoded: bytes | None = None, bgr_hwc: np.ndarray | None = None,
                         box: tuple[int, int, int, int] | None = None) -> bytes:
    """A TensorProtos record as Caffe2's writers made it: [image, INT32 label(, INT32 box)], the
    image an encoded file (STRING) or raw HWC BGR pixels (BYTE, dims (H, W, C))."""
    tensor_proto, tensor_protos = tensor_proto_classes()
    record = tensor_protos()
    image = record.protos.add()
    if encoded is not None:
        image.data_type = tensor_proto.STRING
        image.string_data.append(encoded)
    else:
        image.data_type = tensor_proto.BYTE
        image.dims.extend(bgr_hwc.shape)
        image.byte_data = np.ascontiguousarray(bgr_hwc).tobytes()
    label_tensor = record.protos.add(data_type=tensor_proto.INT32)
    label_tensor.int32_data.append(label)
    if box is not None:
        box_tensor = record.protos.add(data_type=tensor_proto.INT32)
        box_tensor.int32_data.extend(box)
    return record.SerializeToString()


ENCODERS: dict[str, Callable[..., bytes]] = {
    DATUM: encode_datum,
    TENSOR_PROTOS: encode_tensor_protos,
}
