"""LMDB inputs: Caffe Datum and Caffe2 TensorProtos records, read by key ranges, never modified."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers import MOBILENET_INT8, VAL_1300, jpeg_bytes, need, subset_folder
from pipeline.cli import app
from pipeline.config import load_preset
from pipeline.evaluate import evaluate
from pipeline.onnx_model import ModelInfo, make_session, run_model, top_k
from pipeline.preprocess import (Normalizer, Preprocessor, decode_image, preprocess_image, resize_and_crop,
                                 resize_pixels)
from pipeline.sources import detect_format, read_source
from pipeline.sources.base import LMDB_DATA_FILE, Cut, SourceError
from pipeline.sources.datasource import PieceDatasource
from pipeline.sources.lmdb import plan_lmdb
from pipeline.sources.lmdb_records import (DATUM, TENSOR_PROTOS, RecordError, datum_class, decode_datum,
                                           decode_tensor_protos, detect_record_kind, encode_datum,
                                           encode_tensor_protos)
from pipeline.writers.lmdb import write_lmdb
from pipeline.writers.parquet import write_parquet_shards

IMAGES = 200
LMDB_PREFIX = re.compile(r"^\d{8}_")


def lmdb_datasource(db: Path) -> PieceDatasource:
    """The Datasource that `evaluate` reads the LMDB database DB with."""
    return PieceDatasource(plan_lmdb(str(db), None, Cut()))


def put_records(path: Path, records: list[tuple[bytes, bytes]]) -> Path:
    """A fresh LMDB database in PATH holding RECORDS (key, value)."""
    env = lmdb.open(str(path), map_size=1 << 28, lock=False)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()
    return path


def checksum(db: Path) -> str:
    return hashlib.sha256((db / LMDB_DATA_FILE).read_bytes()).hexdigest()


def predictions_by_image(output: Path) -> dict[str, list[int]]:
    """Image file name -> top-5 ids from predictions.parquet (LMDB keys lose their index prefix)."""
    table = pq.read_table(output / "predictions.parquet").to_pydict()
    keys = [LMDB_PREFIX.sub("", k) for k in table["key"]]
    assert len(set(keys)) == len(keys), "every input exactly once"
    return dict(zip(keys, table["top5_ids"]))


@pytest.fixture(scope="module")
def val200(tmp_path_factory) -> Path:
    return subset_folder(need(VAL_1300), tmp_path_factory.mktemp("val") / "val200", IMAGES)


# --- records -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("decode,encode", [(decode_datum, encode_datum), (decode_tensor_protos, encode_tensor_protos)])
def test_raw_records_hold_bgr_and_come_out_rgb(decode, encode, channels):
    bgr = np.random.default_rng(channels).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    record = decode(encode(3, bgr_hwc=bgr))
    assert (record.label, record.raw_height, record.raw_width, record.raw_channels) == (3, 5, 7, channels)
    pixels = np.frombuffer(record.image, np.uint8).reshape(5, 7, channels)
    assert np.array_equal(pixels, bgr[:, :, ::-1])


def test_field_numbers_are_caffes():
    # Datum: data=4 (bytes), label=5, encoded=7, in field order, as Caffe's C++ writes them.
    assert encode_datum(5, encoded=b"ab") == b"\x22\x02ab\x28\x05\x38\x01"
    # TensorProtos written by hand: protos=1; image data_type=2 STRING(4), string_data=6; label
    # INT32(2) with int32_data=4, once packed (as C++ writes it) and once unpacked.
    image = b"\x10\x04\x32\x02ab"
    for label in (b"\x10\x02\x22\x01\x07", b"\x10\x02\x20\x07"):
        value = b"\x0a" + bytes([len(image)]) + image + b"\x0a" + bytes([len(label)]) + label
        record = decode_tensor_protos(value)
        assert (record.label, record.image, record.raw_height) == (7, b"ab", 0)
        assert detect_record_kind(value) == TENSOR_PROTOS
    assert detect_record_kind(encode_datum(5, encoded=b"ab")) == DATUM


def test_other_protobufs_and_bad_records_are_refused_with_a_reason():
    from onnx import numpy_helper

    onnx_tensor = numpy_helper.from_array(np.arange(6, dtype=np.int32).reshape(2, 3), name="w").SerializeToString()
    for value in (onnx_tensor, b"", b"\xff\xff\xff", encode_datum(1, encoded=b"jpeg")[:-4]):
        with pytest.raises(RecordError, match="neither a Caffe Datum nor a Caffe2 TensorProtos"):
            detect_record_kind(value)
    float_datum = datum_class()(channels=1, height=1, width=2, label=0, float_data=[0.5, 1.5]).SerializeToString()
    with pytest.raises(RecordError, match="float_data"):
        decode_datum(float_datum)
    short = datum_class()(channels=3, height=2, width=2, data=b"x" * 11, label=0).SerializeToString()
    with pytest.raises(RecordError, match="11 bytes of pixels for 2x2x3"):
        decode_datum(short)


def test_prepare_keys_follow_input_order_and_unreadable_images_are_listed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    (folder / "c.png").write_bytes(jpeg_bytes(seed=2, fmt="PNG"))
    (folder / "labels.txt").write_text("a.jpg 1\nb.jpg 2\nc.png 3\n")
    counts = write_lmdb(str(folder), str(tmp_path / "raw"), fmt="lmdb-caffe2", encoded=False)
    assert counts["records"] == 2 and [key for key, _ in counts["skipped"]] == ["b.jpg"]
    env = lmdb.open(str(tmp_path / "raw"), readonly=True, lock=False)
    with env.begin() as txn:
        assert [key for key, _ in txn.cursor()] == [b"00000000_a.jpg", b"00000002_c.png"]
    env.close()
    # encoded records keep the bytes as stored: the bad file is written and fails at evaluation
    assert write_lmdb(str(folder), str(tmp_path / "encoded"), fmt="lmdb-datum")["records"] == 3
    with pytest.raises(SourceError, match="already holds an LMDB database"):
        write_lmdb(str(folder), str(tmp_path / "encoded"), fmt="lmdb-datum")


# --- splitting the key space ---------------------------------------------------------------------

KEY_STYLES = {
    "convert_imageset": lambda i: b"%08d_ILSVRC2012_val_%08d.JPEG" % (i, i + 1),
    "unpadded": lambda i: b"%d" % i,
    "hashes": lambda i: hashlib.sha1(b"%d" % i).hexdigest().encode(),
}


@pytest.mark.parametrize("style", KEY_STYLES)
def test_read_tasks_cover_every_key_exactly_once(tmp_path, style):
    keys = [KEY_STYLES[style](i) for i in range(500)]
    db = put_records(tmp_path / "db", [(k, encode_datum(i % 1000, encoded=b"x")) for i, k in enumerate(keys)])
    tasks = lmdb_datasource(db).get_read_tasks(parallelism=16)
    assert len(tasks) > 1
    per_task = [[key for block in task() for key in block.column("key").to_pylist()] for task in tasks]
    read = [key for keys_of_task in per_task for key in keys_of_task]
    assert sorted(read) == sorted(k.decode() for k in keys) and len(read) == len(set(read))
    if style == "convert_imageset":  # index prefixes split evenly
        assert max(map(len, per_task)) <= 2 * -(-len(keys) // len(tasks))


# --- end to end ----------------------------------------------------------------------------------

def test_folder_parquet_datum_and_caffe2_lmdb_give_identical_predictions(ray_local, val200, tmp_path):
    model = str(need(MOBILENET_INT8))
    inputs = {"folder": val200, "parquet": tmp_path / "parquet", "datum": tmp_path / "datum",
              "caffe2": tmp_path / "caffe2"}
    write_parquet_shards(str(val200), str(inputs["parquet"]), shard_size=64)
    write_lmdb(str(val200), str(inputs["datum"]), fmt="lmdb-datum")
    result = CliRunner().invoke(app, ["prepare", "--images", str(val200), "--out", str(inputs["caffe2"]),
                                      "--format", "lmdb-caffe2", "--encoded"])
    assert result.exit_code == 0, result.output
    for db in (inputs["datum"], inputs["caffe2"]):
        assert detect_format(str(db)) == "lmdb"
        assert not (db / "lock.mdb").exists()
    before = {name: checksum(inputs[name]) for name in ("datum", "caffe2")}

    metrics, predictions = {}, {}
    for name, data in inputs.items():
        metrics[name] = evaluate(model, str(data), "torch", str(tmp_path / f"out-{name}"))
        predictions[name] = predictions_by_image(tmp_path / f"out-{name}")
        assert (metrics[name]["images"], metrics[name]["errors"]) == (IMAGES, 0), name
    for name in ("parquet", "datum", "caffe2"):
        assert predictions[name] == predictions["folder"], name
        assert (metrics[name]["top1"], metrics[name]["top5"]) == (metrics["folder"]["top1"], metrics["folder"]["top5"])

    for name in ("datum", "caffe2"):
        db = inputs[name]
        assert checksum(db) == before[name], "reading must not modify data.mdb"
        assert not (db / "lock.mdb").exists(), "reading must not create a lock file"
        # several read tasks, and they all ran: each yields its own blocks
        assert len(lmdb_datasource(db).get_read_tasks(parallelism=8)) > 1
        assert read_source(str(db)).dataset.materialize().num_blocks() > 1


def stored_pixels(db: Path, kind: str) -> dict[str, np.ndarray]:
    """Image name -> RGB pixels, unpacked from the records here by hand (Caffe's layouts: Datum CHW
    BGR, TensorProtos HWC BGR), independently of the reader under test."""
    from pipeline.sources.lmdb_records import tensor_proto_classes

    pixels = {}
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            if kind == DATUM:
                datum = datum_class().FromString(value)
                bgr = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
                bgr = bgr.transpose(1, 2, 0)
            else:
                image = tensor_proto_classes()[1].FromString(value).protos[0]
                bgr = np.frombuffer(image.byte_data, np.uint8).reshape(tuple(image.dims))
            pixels[LMDB_PREFIX.sub("", key.decode())] = bgr[:, :, ::-1]
    env.close()
    return pixels


@pytest.mark.parametrize("fmt,kind", [("lmdb-datum", DATUM), ("lmdb-caffe2", TENSOR_PROTOS)])
def test_raw_pixel_lmdb_predicts_its_stored_pixels(ray_local, val200, tmp_path, fmt, kind):
    model = str(need(MOBILENET_INT8))
    preset = load_preset("torch")
    db = tmp_path / "raw"
    counts = write_lmdb(str(val200), str(db), fmt=fmt, encoded=False, resize=160)
    assert counts["records"] == IMAGES and not counts["skipped"]
    pixels = stored_pixels(db, kind)
    some = next(iter(pixels))
    assert min(pixels[some].shape[:2]) == 160  # resized, so these are not the JPEGs' pixels
    assert np.array_equal(pixels[some], resize_pixels(decode_image((val200 / some).read_bytes()),
                                                      pixels[some].shape[1::-1], "area"))  # and RGB once unpacked

    evaluate(model, str(db), "torch", str(tmp_path / "out"))
    predicted = predictions_by_image(tmp_path / "out")

    info, session, normalize = ModelInfo.from_path(model), make_session(model, threads=1), Normalizer(preset)
    names = sorted(pixels)
    expected = {}
    for start in range(0, len(names), 32):
        chunk = names[start:start + 32]
        crops = np.stack([resize_and_crop(pixels[n], preset) for n in chunk])
        ids, _ = top_k(run_model(session, info, normalize(crops)), 5)
        expected.update(zip(chunk, ids.tolist()))
    assert predicted == expected


def test_caffe2_bounding_boxes_are_cropped_to_before_scaling(ray_local, val200, tmp_path):
    preset = load_preset("caffe2")
    names = sorted(p.name for p in val200.glob("*.JPEG"))[:6]
    boxes = [(10, 20, 150, 120), (0, 0, 227, 227), (50, 5, 100, 200), None, (30, 30, 60, 60), (200, 200, 60, 60)]
    db = put_records(tmp_path / "boxes", [
        (b"%08d_%s" % (i, n.encode()), encode_tensor_protos(i, encoded=(val200 / n).read_bytes(), box=box))
        for i, (n, box) in enumerate(zip(names, boxes))
    ])
    rows = read_source(str(db)).dataset.map_batches(
        Preprocessor(preset), batch_size=16, batch_format="numpy").take_all()
    rows = {LMDB_PREFIX.sub("", r["key"]): r for r in rows}
    for name, box in zip(names, boxes):
        image = decode_image((val200 / name).read_bytes())
        if box and box[0] + box[2] > image.shape[0]:
            assert "outside" in rows[name]["error"]  # a box the image cannot hold is an error row
            continue
        if box:
            ymin, xmin, height, width = box
            image = image[ymin:ymin + height, xmin:xmin + width]
        assert rows[name]["error"] == ""
        assert np.array_equal(Normalizer(preset)(rows[name]["crop"][None])[0], preprocess_image(image, preset)), name


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.ray
def test_bad_databases_are_clear_errors(tmp_path, val200):
    good = tmp_path / "good"
    write_lmdb(str(val200), str(good), fmt="lmdb-datum")

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    with open(truncated / LMDB_DATA_FILE, "r+b") as f:
        f.truncate((truncated / LMDB_DATA_FILE).stat().st_size // 2)
    with pytest.raises(SourceError, match="truncated"):
        read_source(str(truncated))
    result = CliRunner().invoke(app, ["evaluate", "--model", str(need(MOBILENET_INT8)), "--preset", "torch",
                                      "--data", str(truncated), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "truncated" in result.output

    with pytest.raises(SourceError, match="no data.mdb"):
        read_source(str(val200), fmt="lmdb")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / LMDB_DATA_FILE).write_bytes(b"not an lmdb file" * 1000)
    with pytest.raises(SourceError, match="not a readable LMDB database"):
        read_source(str(garbage))

    with pytest.raises(SourceError, match="holds no records"):
        read_source(str(put_records(tmp_path / "empty", [])))
    with pytest.raises(SourceError, match="not image records"):
        read_source(str(put_records(tmp_path / "other", [(b"a", b"\xff" * 10), (b"b", b"hello")])))
    assert not any(tmp_path.rglob("lock.mdb"))


def leaf_pages(data_file: Path, page_size: int = 4096) -> list[int]:
    """Numbers of the B-tree leaf pages of an LMDB file (page header: pgno u64, pad u16, flags u16)."""
    data = data_file.read_bytes()
    return [n for n in range(2, len(data) // page_size)
            if int.from_bytes(data[n * page_size:n * page_size + 8], "little") == n
            and int.from_bytes(data[n * page_size + 10:n * page_size + 12], "little") & 0x02]


def test_a_damaged_page_is_a_clear_error(tmp_path, val200):
    db = tmp_path / "damaged"
    write_lmdb(str(val200), str(db), fmt="lmdb-datum")
    tasks = lmdb_datasource(db).get_read_tasks(parallelism=8)
    with open(db / LMDB_DATA_FILE, "r+b") as f:  # every leaf page now claims to be an overflow page
        for page in leaf_pages(db / LMDB_DATA_FILE):
            f.seek(page * 4096 + 10)
            f.write((0x04).to_bytes(2, "little"))
    for task in tasks:
        with pytest.raises(SourceError, match="damaged LMDB database: reading from"):
            list(task())
    with pytest.raises(SourceError, match="damaged LMDB database"):
        read_source(str(db))


def test_bad_records_are_error_rows_and_nothing_else_is_lost(ray_local, val200, tmp_path):
    from onnx import numpy_helper

    names = sorted(p.name for p in val200.glob("*.JPEG"))[:40]
    labels = dict(line.split() for line in (val200 / "labels.txt").read_text().splitlines())
    good = [(b"%08d_%s" % (i + 1, n.encode()), encode_datum(int(labels[n]), encoded=(val200 / n).read_bytes()))
            for i, n in enumerate(names)]
    bad = {
        b"00000000_garbage": b"\xff\xfe not a protobuf",  # the first record: detection looks further
        b"00000010_onnx": numpy_helper.from_array(np.zeros((2, 2), np.float32), name="w").SerializeToString(),
        b"00000020_float": datum_class()(channels=1, height=1, width=1, float_data=[1.0], label=1).SerializeToString(),
        b"00000030_short": datum_class()(channels=3, height=4, width=4, data=b"x", label=1).SerializeToString(),
    }
    db = put_records(tmp_path / "mixed", good + list(bad.items()))
    metrics = evaluate(str(need(MOBILENET_INT8)), str(db), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["errors"], metrics["evaluated"]) == (44, 4, 40)
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pydict()
    assert sorted(table["key"]) == sorted(k.decode() for k in [k for k, _ in good] + list(bad))
    errors = {k: e for k, e in zip(table["key"], table["error"]) if e}
    assert set(errors) == {k.decode() for k in bad}
    for key, reason in errors.items():
        assert f"LMDB record '{key}'" in reason and "Caffe Datum" in reason
    assert "float_data" in errors["00000020_float"]


def test_records_lost_to_a_damaged_key_order_fail_the_run_instead_of_being_skipped(ray_local, tmp_path):
    """Damage that rewrites a key in place breaks the B-tree's order: the key-range readers then stop
    a range early and skip records with no error of their own. The entry count catches it: evaluate
    writes no metrics and label no finished run."""
    from pipeline.label import label

    keys = [b"%08d_img%02d.jpg" % (i, i) for i in range(12)]
    db = put_records(tmp_path / "db",
                     [(key, encode_datum(i, encoded=jpeg_bytes(seed=i))) for i, key in enumerate(keys)])
    data = bytearray((db / LMDB_DATA_FILE).read_bytes())
    at = data.index(keys[4])
    data[at:at + 8] = b"00000011"  # now out of order between 00000003 and 00000005
    (db / LMDB_DATA_FILE).write_bytes(bytes(data))
    model = str(need(MOBILENET_INT8))
    with pytest.raises(SourceError, match="records were read, but it holds 12: it is damaged"):
        evaluate(model, str(db), output=str(tmp_path / "eval"))
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert not (tmp_path / "eval" / "predictions.parquet").exists()
    with pytest.raises(SourceError, match="records were read, but it holds 12"):
        label(model, str(db), str(tmp_path / "labels"))
    assert not (tmp_path / "labels" / "manifest.json").exists()
    assert not list((tmp_path / "labels" / "labels").glob("*.parquet"))  # nothing committed as done
