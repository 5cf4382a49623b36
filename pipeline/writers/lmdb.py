"""`pipeline prepare --format lmdb-datum | lmdb-caffe2`: an image folder -> an LMDB database of
Caffe `Datum` or Caffe2 `TensorProtos` records, as Caffe's `convert_imageset` and Caffe2's
`make_image_db` wrote them: one record per image in input order, key `%08d_NAME` (the image's index
in the input, zero-padded, then its file name).

- encoded (default): the image file's bytes as stored (re-encoded only when resized: JPEG at
  quality 95 for JPEG input, as OpenCV's `imencode` default, PNG otherwise);
- raw: decoded pixels, BGR as OpenCV gave them to Caffe: CHW in a Datum, HWC in TensorProtos.

`resize` scales the shorter side to that many pixels (aspect ratio kept, area interpolation).
An image that cannot be read (or, for raw records, decoded) is left out, as convert_imageset did,
and reported in the returned counts: a record cannot carry an error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, Optional

import lmdb
from PIL import Image

from pipeline.output import make_output_dir
from pipeline.preprocess import JPEG_MAGIC, decode_image, record_error, scale_shorter_side
from pipeline.sources.base import LMDB_DATA_FILE, SourceError
from pipeline.sources.folder import folder_records_to_read, read_file
from pipeline.sources.lmdb_records import DATUM, ENCODERS, TENSOR_PROTOS

LMDB_FORMATS = {"lmdb-datum": DATUM, "lmdb-caffe2": TENSOR_PROTOS}
READ_CHUNK = 256  # images read and written per transaction
INITIAL_MAP_SIZE = 1 << 30  # LMDB's size limit; doubled whenever a transaction does not fit


def record_value(record_kind: str, label: int, data: bytes, encoded: bool, resize: Optional[int]) -> bytes:
    """One record's bytes (raises ImageError when the image must be decoded and cannot be)."""
    encode = ENCODERS[record_kind]
    if encoded and resize is None:
        return encode(label, encoded=data)
    pixels = decode_image(data)
    if resize is not None:
        pixels = scale_shorter_side(pixels, resize, "area")
    if encoded:
        buffer = io.BytesIO()
        if data.startswith(JPEG_MAGIC):
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        else:
            Image.fromarray(pixels).save(buffer, format="PNG")
        return encode(label, encoded=buffer.getvalue())
    return encode(label, bgr_hwc=pixels[:, :, ::-1])


def _records(images: str, records: list[tuple[str, int]], record_kind: str, encoded: bool, resize: Optional[int],
             skipped: list[tuple[str, str]]) -> Iterator[list[tuple[bytes, bytes]]]:
    """Chunks of (key, value) of RECORDS (key, label) of folder IMAGES in order; unreadable images go to
    SKIPPED as (key, reason)."""
    root = Path(images)
    for start in range(0, len(records), READ_CHUNK):
        chunk = []
        for index, (key, label) in enumerate(records[start:start + READ_CHUNK], start):
            data, error = read_file(root, key)
            if not error:
                try:
                    value = record_value(record_kind, label, data, encoded, resize)
                    chunk.append((b"%08d_%s" % (index, key.encode()), value))
                    continue
                except Exception as exc:  # one record's failure, whatever it is, skips that record only
                    error = record_error(exc)
            skipped.append((key, error))
        yield chunk


def write_lmdb(images: str, out: str, labels: Optional[str] = None, fmt: str = "lmdb-datum",
               encoded: bool = True, resize: Optional[int] = None) -> dict:
    """Write an LMDB database in directory OUT (which must not hold one already). Returns counts and
    the (key, reason) of every image left out."""
    if fmt not in LMDB_FORMATS:
        raise SourceError(f"unknown --format {fmt!r}: prepare writes parquet, {', '.join(LMDB_FORMATS)}")
    if resize is not None and resize < 1:
        raise SourceError("--resize must be at least 1")
    out_dir = Path(out)
    if (out_dir / LMDB_DATA_FILE).exists():
        raise SourceError(f"{out}: already holds an LMDB database; choose a new folder")
    records = folder_records_to_read(images, labels)  # before the output folder is made
    make_output_dir(out_dir)
    skipped: list[tuple[str, str]] = []
    written = 0
    # lock=False: a single writer, and no lock.mdb left beside the database for readers to trip on.
    env = lmdb.open(str(out_dir), map_size=INITIAL_MAP_SIZE, lock=False, subdir=True)
    try:
        for chunk in _records(images, records, LMDB_FORMATS[fmt], encoded, resize, skipped):
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in chunk:
                            txn.put(key, value, overwrite=False)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
            written += len(chunk)
    finally:
        env.close()
    return {"records": written, "skipped": skipped, "format": fmt, "encoded": encoded}


def prepare_lmdb(images: str, out: str, labels: Optional[str], fmt: str, encoded: bool,
                 resize: Optional[int]) -> str:
    """`pipeline prepare --format lmdb-...`: write the database and say what was written."""
    counts = write_lmdb(images, out, labels, fmt, encoded, resize)
    lines = [f"wrote {counts['records']} {'encoded' if encoded else 'raw'} {fmt} records to {out}"]
    if counts["skipped"]:
        lines.append(f"left out {len(counts['skipped'])} images that could not be read:")
        lines += [f"  {key}: {reason}" for key, reason in counts["skipped"]]
    return "\n".join(lines)
