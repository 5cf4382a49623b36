"""Hostile inputs and races: an image or a file that would end, hang or exhaust a run becomes its
own error row; a model whose scores have the wrong shape is refused; two runs never share an output."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import helper
from PIL import Image

from helpers import (MOBILENET_INT8, SAMPLE_1000, VAL_1300, jpeg_bytes, need, run_cli, save_classifier, start_cli,
                     subset_folder)
from pipeline.config import load_preset
from pipeline.onnx_model import ModelError, ModelInfo, make_session, run_model
from pipeline.preprocess import Preprocessor
from pipeline.sources.base import NO_LABEL, Cut, SourceError
from pipeline.sources.datasource import PieceDatasource
from pipeline.sources.folder import plan_folder, read_file, read_folder_records
from pipeline.sources.parquet import plan_parquet, read_row_groups
from pipeline.sources.tar import member_runs, plan_tar, read_tar_blocks, scan_shard, shard_rows, tar_records


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_too_wide_to_scale_is_an_error_row_beside_the_good_ones():
    """A 1 x 10,000,000 PNG (39 KB) would be scaled to 256 x 2.56e9 pixels: an OverflowError that
    ended the run. It is refused before anything is allocated, as its own error row."""
    good = jpeg_bytes(seed=1)
    batch = {"key": np.array(["wide", "ok"], dtype=object), "label": np.array([1, 2]),
             "image": np.array([png_bytes(10_000_000, 1), good], dtype=object),
             "error": np.array(["", ""], dtype=object)}
    out = Preprocessor(load_preset("torch")).preprocess(batch)
    assert "aspect ratio" in out["error"][0] and "10000000x1" in out["error"][0]
    assert out["error"][1] == "" and out["crop"][1].any()


def test_prepare_lmdb_resizing_skips_a_too_wide_image_and_writes_the_rest(tmp_path):
    from pipeline.writers.lmdb import write_lmdb

    images = tmp_path / "images"
    images.mkdir()
    (images / "wide.png").write_bytes(png_bytes(10_000_000, 1))
    (images / "ok.jpg").write_bytes(jpeg_bytes(seed=2))
    counts = write_lmdb(str(images), str(tmp_path / "db"), fmt="lmdb-datum", resize=64)
    assert counts["records"] == 1 and [key for key, _ in counts["skipped"]] == ["wide.png"], counts
    # a size asked for that no image should be scaled to: refused before the pixels are allocated
    counts = write_lmdb(str(images), str(tmp_path / "huge"), fmt="lmdb-datum", resize=20_000)
    assert counts["records"] == 0 and counts["skipped"][0] == (
        "ok.jpg", "image of 64x48 pixels: scaled to 26666x20000, it would be over the 67108864-pixel limit")


@pytest.mark.timeout(60)
def test_a_fifo_a_device_and_an_oversized_file_are_error_rows_not_a_hang(tmp_path):
    """A FIFO blocked the read for ever, a symlink to /dev/zero was read until the OOM killer came."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with open(tmp_path / "huge.jpg", "wb") as f:  # sparse: 1 GB on paper, nothing on disk
        f.truncate(1 << 30)
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(seed=3))
    keys = ["huge.jpg", "ok.jpg", "pipe.jpg", "zero.jpg"]
    table = read_folder_records(tmp_path, [(key, NO_LABEL) for key in keys])
    errors = dict(zip(table.column("key").to_pylist(), table.column("error").to_pylist()))
    assert errors["pipe.jpg"] == "not a regular file: a FIFO (named pipe)"
    assert errors["zero.jpg"] == "not a regular file: a character device"
    assert errors["huge.jpg"].startswith("file larger than the") and errors["huge.jpg"].endswith("limit of one record")
    assert errors["ok.jpg"] == ""
    assert read_file(tmp_path, "ok.jpg", max_bytes=100) == (b"", "file larger than the 100-byte limit of one record")


def classifier_of_three_scores(path):
    """Declares [N, 1000] class scores but returns [N, 3] (each channel's mean)."""
    return save_classifier(path, [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
                                  helper.make_node("Flatten", ["pooled"], ["scores"])], "three_scores")


def test_a_model_whose_output_is_not_n_by_classes_is_refused_at_load(tmp_path):
    model = save_classifier(tmp_path / "rank3.onnx", [helper.make_node("Identity", ["input"], ["scores"])],
                            "rank3", output_shape=("N", 2, 1000))
    with pytest.raises(ModelError, match=r"has shape \[None, 2, 1000\], expected \[N, 1000\]"):
        ModelInfo.from_path(model)


def test_a_model_returning_undeclared_scores_fails_the_batch_with_one_sentence(tmp_path):
    """onnxruntime only warns when the output shape differs from the declared one; the scores of
    3 classes were then ranked as if they were the 1,000 (or failed in Arrow with top-k 20)."""
    info = ModelInfo.from_path(classifier_of_three_scores(tmp_path / "three.onnx"))
    with pytest.raises(ModelError, match=r"returned scores of shape \[2, 3\] for 2 images, not the \[2, 1000\]"):
        run_model(make_session(info.path), info, np.zeros((2, 3, 224, 224), np.float32))


def test_an_output_folder_is_held_by_one_run_at_a_time_and_the_refusal_names_it(tmp_path):
    """Two label runs into one --output both exited 0, one model's labels under the other's
    manifest; two evaluate runs left an unreadable predictions.parquet."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.output import OutputDirError, exclusive_output

    output = tmp_path / "out"
    with exclusive_output(output, "label"):
        # the claim is taken before the folder exists, and makes none
        assert not output.exists()
        with pytest.raises(OutputDirError, match=rf"is the output of a run still going on \(pipeline label, pid "
                                                 rf"{os.getpid()} on .*, started .* UTC\)"):
            with exclusive_output(tmp_path / "." / "out", "evaluate"):  # the same folder, spelt otherwise
                pass
        for command in (["evaluate"], ["label"], ["compare"]):  # refused by the command itself before any work
            result = CliRunner().invoke(app, [*command, "--model", str(tmp_path / "absent.onnx"),
                                              "--data", str(tmp_path), "--output", str(output)])
            assert result.exit_code == 2 and "is the output of a run still going on (pipeline label" in \
                " ".join(result.output.split()), result.output
    with exclusive_output(output, "evaluate"):  # released at the end of the run
        pass


def test_label_resume_refuses_a_preset_file_of_the_same_name_with_other_values(tmp_path):
    """run.json recorded only the preset's name: a torch.yaml of other mean/std resumed happily, and
    the output mixed units labelled two ways under a manifest naming one preset."""
    from pipeline.label import RUN_FILE, check_output, run_description
    from pipeline.output import OutputDirError, write_json

    model, data, output = tmp_path / "model.onnx", tmp_path / "images", tmp_path / "out"
    model.write_bytes(b"the model's bytes")
    data.mkdir()
    output.mkdir()
    torch = load_preset("torch")
    edited = tmp_path / "torch.yaml"
    edited.write_text("name: torch\nchannel_order: RGB\nmean: [0, 0, 0]\nstd: [1, 1, 1]\ninterpolation: bilinear\n"
                      "scale: 256\ncrop: 224\ncrop_offset: round\n")
    first = run_description(str(model), str(data), "folder", torch, 5, 1000)
    write_json(output / RUN_FILE, first)
    assert check_output(output, first, resume=True, overwrite=False) == set()  # the same preset resumes
    with pytest.raises(OutputDirError, match="holds an interrupted run with other settings "
                                             r"\(preset_values was \{.*'mean': \[123.675"):
        check_output(output, run_description(str(model), str(data), "folder", load_preset(str(edited)), 5, 1000),
                     resume=True, overwrite=False)


def test_damaged_run_state_is_one_sentence_naming_the_file_and_what_to_do(tmp_path):
    """An empty run.json or manifest.json (which a crash before the rename could leave), or a
    truncated labels shard, gave a 48-line traceback."""
    import pyarrow.parquet as pq

    from pipeline.label import (ERRORS_SCHEMA, MANIFEST_FILE, RUN_FILE, check_output, labels_schema,
                                shard_counts)
    from pipeline.output import OutputDirError

    output = tmp_path / "out"
    output.mkdir()
    (output / RUN_FILE).write_text("")
    with pytest.raises(OutputDirError, match=rf"^{output / RUN_FILE}: damaged run state \(empty\).*: "
                                             "pass --overwrite to label again$"):
        check_output(output, {}, resume=True, overwrite=False)
    (output / MANIFEST_FILE).write_text('{"images": 3, "lab')
    with pytest.raises(OutputDirError, match=rf"^{output / MANIFEST_FILE}: damaged run state \(not JSON: .*\).*: "
                                             "delete it and pass --resume to write it again from the shards$"):
        check_output(output, {}, resume=True, overwrite=False)
    for table, schema in (("labels", labels_schema(5)), ("errors", ERRORS_SCHEMA)):
        (output / table).mkdir()
        pq.write_table(schema.empty_table(), output / table / "unit.parquet")
    assert shard_counts(output) == {"unit": {"labelled": 0, "errors": 0}}
    shard = output / "labels" / "unit.parquet"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(OutputDirError, match=rf"^{shard}: damaged labels shard \(.*\).*: "
                                             "delete it and pass --resume to label its unit again$"):
        shard_counts(output)


def test_a_file_added_while_label_reads_a_folder_shifts_no_unit(tmp_path):
    """Each read task listed the folder itself: a file added between their listings shifted the
    units, and 15 images were labelled twice and 16 never, in a run that exited 0."""
    for i in range(12):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"x")
    plan = plan_folder(str(tmp_path), None, Cut(2))
    readers, records = PieceDatasource(plan).task_pieces(), plan.records
    keys = [key for piece in readers[0] for block in piece.read() for key in block.column("key").to_pylist()]
    (tmp_path / "00-added.jpg").write_bytes(b"x")  # after the first task has read, before the others
    for reader in readers[1:]:
        keys += [key for piece in reader for block in piece.read() for key in block.column("key").to_pylist()]
    assert sorted(keys) == [f"{i:02d}.jpg" for i in range(12)]  # every listed file once, the new one next run
    assert records == 12


def unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder in which no file can be created: a read-only one, or for root (who writes
    in those too) a folder of the kernel's own /sys."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_an_existing_output_folder_that_cannot_be_written_is_refused_before_work(tmp_path):
    """It gave a 43-line PermissionError traceback once Ray had started (at the first file written)."""
    from pipeline.evaluate import evaluate
    from pipeline.label import label
    from pipeline.output import OutputDirError
    from pipeline.writers.parquet import write_parquet_shards
    from pipeline.writers.lmdb import write_lmdb

    model = str(need(MOBILENET_INT8))
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    (images / "labels.txt").write_text("a.jpg 1\n")
    output = unwritable_folder(tmp_path)
    refusal = rf"^{output}: cannot write files in the output folder \(.+\)$"
    for command in (lambda: write_parquet_shards(str(images), str(output)),
                    lambda: write_lmdb(str(images), str(output)),
                    lambda: label(model, str(images), str(output)),
                    lambda: evaluate(model, str(images), "torch", str(output))):
        with pytest.raises(OutputDirError, match=refusal):
            command()


def test_prepare_into_a_folder_of_shards_is_refused_and_overwrite_replaces_them(tmp_path):
    """It kept the old shards: the second run said "wrote 40 records", evaluate then scored 290."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipeline.cli import app

    images, out = tmp_path / "images", tmp_path / "shards"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    prepare = ["prepare", "--images", str(images), "--out", str(out), "--shard-size", "2"]
    assert CliRunner().invoke(app, prepare).exit_code == 0
    for name in ("0.jpg", "1.jpg", "2.jpg"):
        (images / name).unlink()
    refused = CliRunner().invoke(app, prepare)
    assert refused.exit_code == 2 and f"{out} already holds 3 Parquet shards, which would be read with the new " \
        "ones: give a new --out, or pass --overwrite" in " ".join(refused.output.split()), refused.output
    assert CliRunner().invoke(app, [*prepare, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(out).column("key").to_pylist() == ["3.jpg", "4.jpg"]


def test_a_labels_file_names_files_with_spaces_and_no_key_leads_out_of_the_folder(tmp_path):
    """A name holding a space refused the whole run; a key `../outside.JPEG` read a file outside --data."""
    from pipeline.sources.folder import list_folder_records
    from pipeline.sources.labels import read_labels_file

    data = tmp_path / "data"
    data.mkdir()
    (data / "a photo.jpg").write_bytes(b"a")
    (tmp_path / "outside.JPEG").write_bytes(b"secret")
    (data / "labels.txt").write_text("a photo.jpg 3\n../outside.JPEG 4\n")
    assert read_labels_file(data / "labels.txt") == {"a photo.jpg": 3, "../outside.JPEG": 4}
    records = list_folder_records(data)
    table = read_folder_records(data, records)
    rows = {key: (image, error) for key, image, error in zip(*(table.column(c).to_pylist()
                                                                 for c in ("key", "image", "error")))}
    assert rows == {"a photo.jpg": (b"a", ""), "../outside.JPEG": (b"", "the key names a file outside the folder")}


def test_keys_repeated_across_shards_are_scored_and_counted_in_the_metrics():
    """Duplicate keys across Parquet shards or tar members were scored twice without a word."""
    from pipeline.metrics import AccuracyCounter

    counter = AccuracyCounter()
    for keys in (["a", "b"], ["b", "c"], ["a"]):
        n = len(keys)
        counter.update({"key": np.array(keys, dtype=object), "label": np.zeros(n, np.int64),
                        "top_ids": np.zeros((n, 5), np.int32), "error": np.array([""] * n, dtype=object)})
    summary = counter.summary()
    assert (summary["images"], summary["evaluated"], summary["duplicate_keys"]) == (5, 5, 2)


@pytest.mark.timeout(300)
@pytest.mark.subprocess
def test_ctrl_c_says_what_was_interrupted_and_leaves_no_older_result_looking_current(tmp_path):
    """evaluate exited 130 without a word, an earlier run's metrics.json and predictions.parquet left
    beside the new .partial; label did not say that --resume continues the run."""
    import signal
    import time

    folder = subset_folder(need(VAL_1300), tmp_path / "images", 400)
    model, output = need(MOBILENET_INT8), tmp_path / "out"
    output.mkdir()
    for name in ("metrics.json", "predictions.parquet"):  # an earlier run's results
        (output / name).write_text("earlier")
    for command, started, said in (
            (["evaluate", "--output", output], output / "predictions.parquet.partial",
             f"interrupted: the evaluation stopped before its end: {output} holds no result of it"),
            (["label", "--output", output / "labels"], output / "labels" / "run.json",
             f"interrupted: {output / 'labels'} keeps the units finished so far: --resume finishes the run")):
        run = start_cli(*command, "--model", model, "--preset", "torch", "--data", folder)
        while not started.exists():
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        text = " ".join(run.communicate(timeout=120)[0].split())
        assert run.returncode == 130 and said in text and "Traceback" not in text, text
    assert not (output / "metrics.json").exists() and not (output / "predictions.parquet").exists()


def test_a_ctrl_c_that_a_finalizer_drops_still_stops_the_stream(ray_local, capfd):
    """Python drops a KeyboardInterrupt raised inside a `__del__` ("Exception ignored in"): a Ctrl-C
    that landed in one of Ray's finalizers while the predictions streamed let the run go on to its end
    and exit 0."""
    import signal

    import ray.data

    from pipeline.streaming import stream_batches

    class SendsCtrlCWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the SIGINT handler here, in the finalizer

    batches = []

    def take(batch):
        batches.append(len(batch["key"]))
        if len(batches) == 1:
            SendsCtrlCWhenCollected()  # collected at once

    dataset = ray.data.from_items([{"key": str(i)} for i in range(40)], override_num_blocks=4)
    with pytest.raises(KeyboardInterrupt):
        stream_batches(dataset, take)
    assert len(batches) == 1
    assert "Exception ignored" not in capfd.readouterr().err

def test_an_lmdb_whose_first_records_are_damaged_is_read_by_its_first_good_one(tmp_path):
    """Only the first 16 records were looked at: a database of 16 damaged records and 20 good ones
    after them was refused whole."""
    import lmdb

    from pipeline.sources.lmdb import inspect_lmdb
    from pipeline.sources.lmdb_records import DATUM, ENCODERS

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for i in range(16):
            txn.put(b"%08d" % i, b"\x08damaged")
        for i in range(16, 36):
            txn.put(b"%08d" % i, ENCODERS[DATUM](i, encoded=jpeg_bytes(seed=i)))
    env.close()
    info = inspect_lmdb(tmp_path / "db")
    assert (info.record_kind, info.entries) == (DATUM, 36)


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def webdataset_shard(path: Path, images: list[bytes], classes: list[int]) -> Path:
    """A WebDataset shard of IMAGES: sample `sNNNN` is `.jpg`, `.cls` (before the image in every
    third sample, after it otherwise) and `.json` in every other one; then a `.cls` whose sample has
    no image, an image whose `.cls` holds a class name, and an image with two `.cls`."""
    with tarfile.open(path, "w") as archive:
        for n, (image, cls) in enumerate(zip(images, classes)):
            members = [(f"s{n:04d}.jpg", image), (f"s{n:04d}.cls", f"{cls}\n".encode())]
            members += [(f"s{n:04d}.json", json.dumps({"n": n}).encode())] if n % 2 else []
            for name, data in (members[1:2] + members[:1] + members[2:]) if n % 3 == 0 else members:
                add_member(archive, name, data)
        add_member(archive, "orphan.cls", b"7")
        add_member(archive, "named.jpg", images[0])
        add_member(archive, "named.cls", b"tench")
        for name, data in (("dup.jpg", images[0]), ("dup.cls", b"1"), ("dup.cls", b"2")):
            add_member(archive, name, data)
    return path


NAMED_CLS = "its sample's named.cls does not hold a class index (ASCII digits): b'tench'"
SECOND_CLS = "a second .cls sidecar of sample dup: its first one, dup.cls, is read"


def test_webdataset_sidecars_label_their_image_in_runs_never_split(tmp_path):
    """key.cls and key.json were error rows each. A .cls labels its sample's image whatever their
    order, a .json is metadata; a .cls without image is passed on as any member, a .cls without a class
    index or a second one is one error row; runs of any size start at samples, and plan what they read."""
    classes = [(37 * n) % 1000 for n in range(12)]
    shard = webdataset_shard(tmp_path / "wds.tar", [jpeg_bytes(seed=n) for n in range(12)], classes)
    blocks = list(read_tar_blocks(str(shard), ""))
    rows = [row for block in blocks for row in zip(*block.select(["key", "label", "error"]).to_pydict().values())]
    assert rows == [(f"s{n:04d}.jpg", cls, "") for n, cls in enumerate(classes)] + [
        ("orphan.cls", NO_LABEL, ""), ("named.jpg", NO_LABEL, NAMED_CLS), ("dup.jpg", 1, ""),
        ("dup.cls", NO_LABEL, SECOND_CLS)]
    # the labels file is the user's explicit input: it wins over a .cls
    labelled = next(read_tar_blocks(str(shard), "", {"s0001.jpg": 5}))
    assert labelled.column("label").to_pylist()[:3] == [classes[0], 5, classes[2]]

    scan = scan_shard(str(shard), "")
    assert shard_rows(str(shard), "", scan) == len(rows) == 16
    whole = list(tar_records(str(shard), ""))
    with tarfile.open(shard) as archive:
        samples = [member.name.split(".")[0] for member in archive]
    for size in range(1, 12):
        runs = member_runs(scan, size)
        read = [list(tar_records(str(shard), "", run)) for run in runs]
        assert [row for run in read for row in run] == whole, size
        assert [len(run) for run in read] == [shard_rows(str(shard), "", scan, run) for run in runs], size
        assert all(run.rows in (None, len(rows)) for run, rows in zip(runs, read))
        # a run starts at a sample's first member: `.cls` first in every third sample, `.jpg` otherwise
        assert all(samples[run.before - 1] != samples[run.before] for run in runs[1:]), size
    assert len(member_runs(scan, 4)) > 1

    plan = plan_tar(str(shard), None, Cut(10))
    units = [(piece, [row for block in piece.read() for row in block.column("key").to_pylist()])
             for piece in plan.pieces]
    assert plan.records == sum(len(keys) for _, keys in units) == 16
    assert all(piece.rows in (None, len(keys)) for piece, keys in units)
    assert [piece.id.rsplit("-m", 1)[1] for piece, _ in units] == [f"{run.before:09d}"
                                                                     for run in member_runs(scan, 10)]
    assert [key for _, keys in units for key in keys] == [key for key, _, _ in whole]


@pytest.mark.subprocess
def test_a_webdataset_shard_is_evaluated_by_its_cls_labels_with_exact_counts(tmp_path):
    """evaluate on one WebDataset shard, cut into runs: the top-1 is scored against the .cls labels,
    and every image and bad sidecar is counted once."""
    model, sample = need(MOBILENET_INT8), need(SAMPLE_1000)
    truth = dict(line.split() for line in (sample / "labels.txt").read_text().splitlines())
    names = sorted(truth)[:40]
    classes = [int(truth[name]) for name in names]
    shard = webdataset_shard(tmp_path / "wds.tar", [(sample / name).read_bytes() for name in names], classes)
    plan = plan_tar(str(shard), None, Cut())  # as `evaluate` plans it
    assert len(plan.pieces) > 1 and plan.records == 44

    result = run_cli("evaluate", "--model", model, "--preset", "torch", "--data", shard, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (44, 41, 3)
    predictions = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()}
    images = [f"s{n:04d}.jpg" for n in range(40)]
    assert sorted(predictions) == sorted(images + ["orphan.cls", "named.jpg", "dup.jpg", "dup.cls"])
    assert [predictions[key]["label"] for key in images + ["dup.jpg"]] == classes + [1]
    assert {key: row["error"] for key, row in predictions.items() if row["error"]} == {
        "orphan.cls": "no label for this image", "named.jpg": NAMED_CLS, "dup.cls": SECOND_CLS}
    top1 = sum(predictions[key]["top5_ids"][0] == predictions[key]["label"] for key in images + ["dup.jpg"])
    assert metrics["top1_correct"] == top1 and metrics["top1"] == top1 / 41 > 0.5


def write_shard(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_a_parquet_column_of_the_wrong_type_is_named_and_bad_values_are_rows(tmp_path):
    """A column of the wrong type refused the run with an Arrow error naming no column; a key that is
    not UTF-8, or a uint64 label past int64, refused the whole read for one value."""
    images = pa.array([jpeg_bytes(seed=1), jpeg_bytes(seed=2)])
    for name, columns, sentence in (
            ("error", {"image": images, "error": pa.array([0, 1])},
             "the error column must hold text (why a record could not be read, empty for a good one); it is int64"),
            ("key", {"key": pa.array([[1], [2]]), "image": images},
             "the key column must hold the records' names (text, bytes or numbers); it is list<element: int64>"),
            ("image", {"image": pa.array([{"bytes": 1}, {"bytes": 2}])},
             "the bytes field of the image column must hold the encoded image (binary); it is int64")):
        shard = write_shard(tmp_path / f"{name}.parquet", columns)
        for cut in (Cut(), Cut(1000)):  # as evaluate and label plan it
            with pytest.raises(SourceError) as refused:
                plan_parquet(shard, None, cut)
            assert str(refused.value) == f"{shard}: {sentence}"

    shard = write_shard(tmp_path / "values.parquet", {
        "key": pa.array([b"caf\xe9.jpg", b"ok.jpg"]), "image": images,
        "label": pa.array([2**64 - 1, 3], pa.uint64())})
    rows = pa.concat_tables(read_row_groups(shard, "values.parquet", [0], ["key", "image", "label"])).to_pylist()
    assert [(row["key"], row["label"], row["error"]) for row in rows] == [
        ("caf\\xe9.jpg", NO_LABEL, "label 18446744073709551615 out of range 0..999"), ("ok.jpg", 3, "")]


def test_members_of_one_key_are_not_held_whole_and_cut_as_without_sidecars(tmp_path):
    """`frame.000001.jpg`, ... share the sample key `frame`: without sidecars the shard is cut and
    read as before; with a .cls past the members a sample holds, the images are passed on unlabelled
    and the .cls is an error row (it was passed on as an image)."""
    frames, late = tmp_path / "frames.tar", tmp_path / "late.tar"
    for shard, sidecars in ((frames, []), (late, [("frame.cls", b"3")])):
        with tarfile.open(shard, "w") as archive:
            for name, data in [(f"frame.{n:06d}.jpg", jpeg_bytes(size=(8, 8), seed=n)) for n in range(100)] + sidecars:
                add_member(archive, name, data)
    scan = scan_shard(str(frames), "")
    assert [run.before for run in member_runs(scan, 30)] == [0, 30, 60, 90]
    assert [run.rows for run in member_runs(scan, 30)] == [30, 30, 30, None]

    rows = list(read_tar_blocks(str(late), ""))[0].select(["key", "label", "error"]).to_pylist()
    assert len(rows) == 101 and {row["label"] for row in rows[:100]} == {NO_LABEL}
    assert rows[100] == {"key": "frame.cls", "label": NO_LABEL, "error": "a .cls sidecar after the first 64 members "
                         "of sample frame, which are not held for it"}
    assert len(member_runs(scan_shard(str(late), ""), 30)) == 1  # a sample holding a sidecar is never split
