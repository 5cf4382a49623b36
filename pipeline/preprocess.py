"""Decoding and preprocessing: bytes -> RGB pixels -> scale, centre crop, channel order, mean/std, NCHW.

Every choice comes from a `Preset` (conf/*.yaml); this module only carries them out. Images travel
as uint8 HWC RGB numpy arrays. The single-image functions are what the reference loop and the
benchmarks call; `Preprocessor` applies them to a batch of source rows inside Ray Data map tasks.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Iterator

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.classes import NUM_CLASSES
from pipeline.config import Preset
from pipeline.sources.base import BBOX_COLUMNS, NO_LABEL, RAW_COLUMNS
from pipeline.timing import DECODE, READ

# Every worker does one core's share of the work; OpenCV's own thread pool would compete with the
# other workers and the inference actors for the same cores.
cv2.setNumThreads(1)

PILLOW_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

JPEG_MAGIC = b"\xff\xd8\xff"  # start of image, then a marker: how Pillow recognises a JPEG

# The widest aspect ratio scaled: the shorter side goes to the preset's scale, so a 1 x 10,000,000
# image would be scaled to 256 x 2.56e9 pixels (gigabytes, or an overflow). Panoramas are under 10:1.
MAX_ASPECT_RATIO = 100
# The most pixels an image is scaled to (`prepare --resize` takes any size): 200 MB of RGB
MAX_SCALED_PIXELS = 1 << 26


class ImageError(ValueError):
    """A record whose image cannot be used; the message is the reason written to the error row."""


def record_error(exc: Exception) -> str:
    """The error row's reason for an exception raised by one record's decode or resize: an
    ImageError's own sentence; any other (a decoder or resampler bug that one file trips) named."""
    if isinstance(exc, ImageError):
        return str(exc)
    return f"cannot preprocess image: {type(exc).__name__}: {exc}"


def decode_with_pillow(data: bytes) -> np.ndarray:
    """Encoded bytes (any format Pillow reads) -> uint8 HWC RGB. Greyscale, CMYK, palette and alpha
    images are converted as torchvision's loader does (`convert("RGB")`: alpha is dropped, not
    blended)."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Image.UnidentifiedImageError:
        raise ImageError(f"not a recognised image format ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    except Exception as exc:  # a malformed file can trip any decoder bug; it is still one bad record
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits first, PIL's RGB conversion would clip instead.
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max() or 1.0
        image = Image.fromarray(np.round(pixels * (255.0 / peak)).astype(np.uint8), "L")
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 HWC RGB.

    JPEGs go straight from libjpeg-turbo into a numpy array (simplejpeg): the same decoder and
    settings as Pillow's, so the same pixels, in two thirds of the time and without Pillow's
    4-byte-per-pixel copy. Whatever it declines (other formats, CMYK, damaged or oversized files)
    goes to Pillow, which decodes it or says what is wrong."""
    if data.startswith(JPEG_MAGIC):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            # the decompression-bomb limit Pillow applies to other formats (None: switched off)
            if Image.MAX_IMAGE_PIXELS is None or height * width <= Image.MAX_IMAGE_PIXELS:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError:
            pass
    return decode_with_pillow(data)


def raw_pixels(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """Raw HWC uint8 pixels (RGB, or greyscale for one channel) -> uint8 HWC RGB."""
    if channels not in (1, 3):
        raise ImageError(f"raw pixels with {channels} channels: expected 1 or 3")
    if len(data) != height * width * channels:
        raise ImageError(f"raw pixels: {len(data)} bytes for {height}x{width}x{channels}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    return np.repeat(pixels, 3, axis=2) if channels == 1 else pixels


def crop_to_box(pixels: np.ndarray, ymin: int, xmin: int, height: int, width: int) -> np.ndarray:
    """Crop to a bounding box (Caffe2's TensorProtos bbox), checked against the image."""
    image_height, image_width = pixels.shape[:2]
    if ymin < 0 or xmin < 0 or height <= 0 or width <= 0 or ymin + height > image_height \
            or xmin + width > image_width:
        raise ImageError(f"bounding box (ymin={ymin}, xmin={xmin}, height={height}, width={width}) "
                         f"outside the {image_width}x{image_height} image")
    return np.ascontiguousarray(pixels[ymin:ymin + height, xmin:xmin + width])


def resize_pixels(pixels: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """uint8 HWC pixels -> (width, height) SIZE.

    "area" is OpenCV's INTER_AREA, which Caffe2's image input used: when shrinking, each output
    pixel averages the source area it covers, partly covered source pixels weighted by their
    share (Pillow's box filter counts whole pixels instead: 3 levels apart on average, up to 199);
    when enlarging, OpenCV's area-based bilinear. The other filters are Pillow's, as
    torchvision's PIL transforms use them (antialiased when shrinking)."""
    if interpolation == "area":
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return np.asarray(Image.fromarray(pixels).resize(size, PILLOW_FILTERS[interpolation]))


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """Shorter side -> SCALE, longer side -> int(longer * scale / shorter), as Caffe2 and torchvision."""
    if width <= height:
        return scale, int(height * scale / width)
    return int(width * scale / height), scale


def crop_origin(size: int, crop: int, rule: str) -> int:
    return (size - crop) // 2 if rule == "floor" else int(round((size - crop) / 2.0))


def scale_shorter_side(pixels: np.ndarray, scale: int, interpolation: str) -> np.ndarray:
    """uint8 HWC pixels with the shorter side resized to SCALE (see `scaled_size`)."""
    height, width = pixels.shape[:2]
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image of {width}x{height} pixels: its aspect ratio is beyond {MAX_ASPECT_RATIO}:1, "
                         "too wide to scale")
    size = scaled_size(width, height, scale)
    if size[0] * size[1] > MAX_SCALED_PIXELS:
        raise ImageError(f"image of {width}x{height} pixels: scaled to {size[0]}x{size[1]}, it would be over "
                         f"the {MAX_SCALED_PIXELS}-pixel limit")
    return pixels if size == (width, height) else resize_pixels(pixels, size, interpolation)


def resize_and_crop(pixels: np.ndarray, preset: Preset) -> np.ndarray:
    """uint8 HWC RGB pixels -> uint8 HWC centre crop of size preset.crop, in RGB order."""
    pixels = scale_shorter_side(pixels, preset.scale, preset.interpolation)
    height, width = pixels.shape[:2]
    left = crop_origin(width, preset.crop, preset.crop_offset)
    top = crop_origin(height, preset.crop, preset.crop_offset)
    return pixels[top:top + preset.crop, left:left + preset.crop]


class Normalizer:
    """uint8 RGB HWC crops -> float32 NCHW in the preset's channel order, (x - mean) / std."""

    def __init__(self, preset: Preset):
        # output channel c is taken from RGB channel source[c]
        self.source = (2, 1, 0) if preset.channel_order == "BGR" else (0, 1, 2)
        self.mean = np.asarray(preset.mean, dtype=np.float32)
        self.inv_std = (1.0 / np.asarray(preset.std, dtype=np.float64)).astype(np.float32)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        # one channel plane at a time: a strided uint8 read and a contiguous float32 write, several
        # times faster than converting the HWC block to float and transposing it afterwards
        out = np.empty((crops.shape[0], 3) + crops.shape[1:3], dtype=np.float32)
        for c, src in enumerate(self.source):
            np.subtract(crops[..., src], self.mean[c], out=out[:, c], dtype=np.float32)
            out[:, c] *= self.inv_std[c]
        return out


def preprocess_image(pixels: np.ndarray, preset: Preset) -> np.ndarray:
    """One uint8 HWC RGB image -> float32 [3, crop, crop], the model's input."""
    return Normalizer(preset)(resize_and_crop(pixels, preset)[None])[0]


def label_error(label: int) -> str:
    if label == NO_LABEL:
        return "no label for this image"
    if not 0 <= label < NUM_CLASSES:
        return f"label {label} out of range 0..{NUM_CLASSES - 1}"
    return ""


PREPROCESS_CHUNK = 32


class Preprocessor:
    """Ray Data map_batches callable: source rows -> `key, label, crop, error` rows, where `crop` is
    the uint8 HWC RGB centre crop; the model's float input is made from it by `Normalizer` where
    the model runs.

    The crops cross the object store, not the float32 NCHW inputs: a quarter of the bytes (150 KB
    an image at 224x224 instead of 602 KB) to write, transfer and read, and the same float inputs
    bit for bit, since the normalisation is the same numpy arithmetic wherever it runs.

    A row whose read, decode or label fails keeps its key and gets the reason in `error` and an
    all-zero crop, so every record reaches the output exactly once. Columns named in CARRY are
    copied through unchanged (the labelling job's work-unit tags).

    Called on a whole read block (map_batches with batch_size=None, which lets Ray Data fuse it
    into the read task), it yields the rows PREPROCESS_CHUNK records at a time, so that a block of
    any size never has all of its decoded images in memory at once.
    """

    def __init__(self, preset: Preset, require_label: bool = True, carry: tuple[str, ...] = ()):
        self.preset = preset
        self.require_label = require_label
        self.carry = carry

    def _pixels(self, batch: dict, i: int) -> np.ndarray:
        if RAW_COLUMNS[0] in batch and int(batch[RAW_COLUMNS[0]][i]) > 0:
            pixels = raw_pixels(batch["image"][i], *(int(batch[c][i]) for c in RAW_COLUMNS))
        else:
            pixels = decode_image(batch["image"][i])
        if BBOX_COLUMNS[0] in batch:
            box = [int(batch[c][i]) for c in BBOX_COLUMNS]
            if any(box):
                pixels = crop_to_box(pixels, *box)
        return pixels

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(block["key"]), PREPROCESS_CHUNK):
            yield self.preprocess({column: values[start:start + PREPROCESS_CHUNK]
                                   for column, values in block.items()})

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        crop = self.preset.crop
        crops = np.zeros((n, crop, crop, 3), dtype=np.uint8)
        errors = np.array([str(e) for e in batch["error"]], dtype=object)
        labels = batch["label"].astype(np.int64)
        decode_seconds = np.zeros(n)
        for i in range(n):
            if errors[i]:
                continue
            if self.require_label and (reason := label_error(int(labels[i]))):
                errors[i] = reason
                continue
            started = time.thread_time()
            try:
                crops[i] = resize_and_crop(self._pixels(batch, i), self.preset)
            except Exception as exc:  # one record's failure, whatever it is, is that record's error row
                errors[i] = record_error(exc)
            decode_seconds[i] = time.thread_time() - started
        return {"key": batch["key"], "label": labels, "crop": crops, "error": errors, DECODE: decode_seconds,
                **{column: batch[column] for column in (*self.carry, READ) if column in batch}}
