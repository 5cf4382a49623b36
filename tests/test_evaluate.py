"""`pipeline evaluate` end to end on real images and real int8 models, against the plain loop."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import MOBILENET_INT8, RESNET50_INT8, SHARED, VAL_1300, jpeg_bytes, need, run_cli, subset_folder
from pipeline.config import load_preset
from pipeline.evaluate import evaluate
from pipeline.onnx_model import ModelError, ModelInfo, make_session, run_model, top_k
from pipeline.writers.parquet import write_parquet_shards
from testkit.reference import reference_predictions


def read_predictions(output) -> dict[str, tuple]:
    table = pq.read_table(output / "predictions.parquet").to_pylist()
    keys = [row["key"] for row in table]
    assert len(keys) == len(set(keys)), "a key appears twice in predictions.parquet"
    return {row["key"]: row for row in table}


def test_mobilenet_matches_the_single_process_loop(ray_local, tmp_path):
    need(MOBILENET_INT8), need(VAL_1300)
    metrics = evaluate(str(MOBILENET_INT8), str(VAL_1300), "torch", str(tmp_path))
    reference = list(reference_predictions(str(MOBILENET_INT8), VAL_1300, load_preset("torch")))
    assert metrics["images"] == metrics["evaluated"] == len(reference) == 1300
    ref_top1 = sum(ids[0] == label for _, label, ids in reference)
    ref_top5 = sum(label in ids for _, label, ids in reference)
    assert (metrics["top1_correct"], metrics["top5_correct"]) == (ref_top1, ref_top5)
    predictions = read_predictions(tmp_path)
    same_top1 = sum(predictions[key]["top5_ids"][0] == ids[0] for key, _, ids in reference)
    assert same_top1 / len(reference) >= 0.995
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for field in ("model", "data", "preset", "images", "top1", "top5", "errors", "wall_s", "images_per_s",
                  "per_class"):
        assert field in on_disk
    assert sum(c["images"] for c in on_disk["per_class"].values()) == 1300
    assert 0.65 < metrics["top1"] < 0.80  # the model zoo's int8 MobileNetV2 on pre-resized val images


def test_folder_and_parquet_shards_give_identical_predictions(ray_local, tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 120)
    counts = write_parquet_shards(str(folder), str(tmp_path / "shards"), shard_size=50)
    assert counts == {"records": 120, "shards": 3, "unreadable": 0}
    from_folder = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "a"))
    from_parquet = evaluate(str(MOBILENET_INT8), str(tmp_path / "shards"), "torch", str(tmp_path / "b"))
    a, b = read_predictions(tmp_path / "a"), read_predictions(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 120
    for key in a:
        assert a[key]["top5_ids"] == b[key]["top5_ids"]
        assert np.allclose(a[key]["top5_probs"], b[key]["top5_probs"])
    assert from_folder["top1_correct"] == from_parquet["top1_correct"]


def test_a_parquet_shard_is_read_by_several_tasks_at_its_row_groups(ray_local, tmp_path):
    """One shard of 150 images is split at its row groups (64 rows each, as prepare writes them), so
    more than one core reads and preprocesses it; every row is read exactly once."""
    from pipeline.sources import read_source
    from pipeline.sources.base import Cut
    from pipeline.sources.datasource import PieceDatasource
    from pipeline.sources.parquet import plan_parquet

    write_parquet_shards(str(subset_folder(need(VAL_1300), tmp_path / "images", 150)), str(tmp_path / "shards"))
    (shard,) = (tmp_path / "shards").glob("*.parquet")
    metadata = pq.read_metadata(shard)
    assert metadata.num_row_groups == 3
    tasks = PieceDatasource(plan_parquet(str(shard), None, Cut())).get_read_tasks(1)
    assert [task.metadata.num_rows for task in tasks] == [64, 64, 22]
    rows = read_source(str(tmp_path / "shards")).dataset.take_all()
    expected = pq.read_table(shard, columns=["key", "label"]).to_pylist()
    assert sorted((row["key"], row["label"]) for row in rows) == sorted((r["key"], r["label"]) for r in expected)
    assert len(rows) == 150 and all(row["error"] == "" and row["image"] for row in rows)


def test_a_shard_of_one_row_group_is_preprocessed_in_blocks_re_cut_from_its_one_read(ray_local, tmp_path):
    """pyarrow writes up to a million rows as one row group, which one task must read whole. Its rows
    are re-cut into a task's share each and preprocessed by that many tasks, not by the read task
    alone; the predictions are the row-grouped shards'."""
    from pipeline.predict import predict
    from pipeline.sources import read_source
    from pipeline.sources.base import read_task_split

    write_parquet_shards(str(subset_folder(need(VAL_1300), tmp_path / "images", 150)), str(tmp_path / "shards"))
    one = tmp_path / "one" / "all.parquet"
    one.parent.mkdir()
    pq.write_table(pq.read_table(tmp_path / "shards"), one)
    assert pq.read_metadata(one).num_row_groups == 1
    per_task, tasks = read_task_split(150)
    source = read_source(str(one))
    # prepare's row groups are a block each: preprocessed inside their read tasks
    assert source.recut_rows == per_task and read_source(str(tmp_path / "shards")).recut_rows is None
    rows = predict(source, ModelInfo.from_path(need(MOBILENET_INT8)), load_preset("torch"), require_label=True,
                   top_k=5, batch_size=32).materialize()
    operators = {line.split(":")[0].split(" ", 2)[2]: line.split(":")[1]
                 for line in rows.stats().splitlines() if line.startswith("Operator")}
    assert list(operators) == ["ReadParquetRowGroup",
                               f"StreamingRepartition[num_rows_per_block={per_task},strict=False]",
                               "MapBatches(Preprocessor)", "MapBatches(Classifier)"]
    assert operators["ReadParquetRowGroup"].startswith(" 1 tasks executed")
    assert operators["MapBatches(Preprocessor)"].startswith(f" {tasks} tasks executed")
    evaluate(str(MOBILENET_INT8), str(one), "torch", str(tmp_path / "a"))
    evaluate(str(MOBILENET_INT8), str(tmp_path / "shards"), "torch", str(tmp_path / "b"))
    a, b = read_predictions(tmp_path / "a"), read_predictions(tmp_path / "b")
    assert len(a) == 150 and {k: r["top5_ids"] for k, r in a.items()} == {k: r["top5_ids"] for k, r in b.items()}


def test_shards_with_and_without_a_label_column_keep_every_label(ray_local, tmp_path):
    from pipeline.sources import read_source
    from pipeline.sources.base import NO_LABEL

    write_parquet_shards(str(subset_folder(need(VAL_1300), tmp_path / "images", 6)), str(tmp_path / "shards"),
                         shard_size=3)
    first, second = sorted((tmp_path / "shards").glob("*.parquet"))
    pq.write_table(pq.read_table(first).drop_columns(["label"]), first)  # the first shard has none
    rows = read_source(str(tmp_path / "shards")).dataset.take_all()
    labels = {row["key"]: row["label"] for row in rows}
    expected = {row["key"]: row["label"] for row in pq.read_table(second).to_pylist()}
    assert len(rows) == 6 and sum(label == NO_LABEL for label in labels.values()) == 3
    assert {key: labels[key] for key in expected} == expected


@pytest.mark.parametrize("fmt,read", [("folder", "ReadImageFolder"), ("lmdb", "ReadLMDB"),
                                      ("parquet", "ReadParquetRowGroup")])
def test_preprocessing_runs_inside_the_read_tasks(ray_local, tmp_path, fmt, read):
    """Read and preprocessing fuse into one task per block (no second task, no trip through the
    object store for the encoded bytes); inference stays in its actors."""
    from pipeline.predict import predict
    from pipeline.sources import read_source
    from pipeline.writers.lmdb import write_lmdb

    data = subset_folder(need(VAL_1300), tmp_path / "images", 150)
    if fmt == "lmdb":
        write_lmdb(str(data), str(tmp_path / "lmdb"))
        data = tmp_path / "lmdb"
    if fmt == "parquet":
        write_parquet_shards(str(data), str(tmp_path / "shards"))
        data = tmp_path / "shards"
    info = ModelInfo.from_path(need(MOBILENET_INT8))
    rows = predict(read_source(str(data)), info, load_preset("torch"), require_label=True, top_k=5,
                   batch_size=32).materialize()
    operators = [line.split(":")[0] for line in rows.stats().splitlines() if line.startswith("Operator")]
    assert operators == [f"Operator 1 {read}->MapBatches(Preprocessor)", "Operator 2 MapBatches(Classifier)"]
    assert rows.count() == 150


def test_resnet50_int8_with_caffe2_preset(ray_local, tmp_path):
    metrics = evaluate(str(need(RESNET50_INT8)), str(need(VAL_1300)), "caffe2", str(tmp_path), limit=24)
    assert metrics["preset"] == "caffe2" and metrics["evaluated"] == 24
    predictions = read_predictions(tmp_path)
    for row in predictions.values():
        assert row["top5_probs"] == sorted(row["top5_probs"], reverse=True)
        assert 0 < sum(row["top5_probs"]) <= 1.0001


def test_bad_inputs_become_error_rows_and_everything_is_counted(ray_local, tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 6)
    good = sorted(p.name for p in folder.glob("*.JPEG"))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(size=(300, 300))[:500])
    (folder / "range.jpg").write_bytes(jpeg_bytes(seed=3))
    labels = ((folder / "labels.txt").read_text()
              + "empty.jpg 1\nnotes.txt 2\ntruncated.jpg 3\nrange.jpg 1000\nmissing.jpg 4\n")
    (folder / "labels.txt").write_text(labels)
    (folder / "unlabelled.jpg").write_bytes(jpeg_bytes(seed=4))
    metrics = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "out"), probabilities=True)
    predictions = read_predictions(tmp_path / "out")
    errors = {key: row["error"] for key, row in predictions.items() if row["error"]}
    for key, row in predictions.items():  # each image's whole class distribution, nothing for an error row
        probs = np.array(row["probs"])
        if key in errors:
            assert not probs.any() and row["top5_ids"] == [-1] * 5
        else:
            assert probs.sum() == pytest.approx(1, abs=1e-4) and probs.argmax() == row["top5_ids"][0]
            assert probs[row["top5_ids"]].tolist() == pytest.approx(row["top5_probs"])
    assert errors == {
        "empty.jpg": "empty image (0 bytes)",
        "notes.txt": "not a recognised image format (12 bytes)",
        "truncated.jpg": errors["truncated.jpg"],
        "range.jpg": "label 1000 out of range 0..999",
        "missing.jpg": "file not found",
        "unlabelled.jpg": "no label for this image",
    }
    assert errors["truncated.jpg"].startswith("truncated or corrupt image")
    assert metrics["images"] == len(predictions) == 12
    assert (metrics["evaluated"], metrics["errors"]) == (len(good), 6)


def tiny_classifier(path, batch, classes=1001, shape=(3, 224, 224)):
    """A real ONNX model: global average pool -> linear to CLASSES scores."""
    weight = np.random.default_rng(0).normal(size=(shape[0], classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["scores"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def test_tied_classes_rank_lowest_id_first():
    # quantised logits tie: the ranking must not depend on how a partial sort happens to order them
    probs = np.zeros((2, 1000), np.float32)
    probs[0, [900, 7, 450]] = 0.3
    probs[0, 3] = 0.1
    probs[1, ::-1] = np.linspace(0.0, 1.0, 1000)  # no ties: plain descending order
    ids, values = top_k(probs, 5)
    assert ids[0].tolist() == [7, 450, 900, 3, 0] and np.allclose(values[0], [0.3, 0.3, 0.3, 0.1, 0.0])
    assert ids[1].tolist() == [0, 1, 2, 3, 4]


def test_fixed_batch_model_with_background_class(tmp_path):
    path = str(tmp_path / "fixed.onnx")
    weight = tiny_classifier(path, batch=4)
    info = ModelInfo.from_path(path)
    assert (info.batch_size, info.num_outputs, info.outputs_probabilities) == (4, 1001, False)
    inputs = np.random.default_rng(1).normal(size=(6, 3, 224, 224)).astype(np.float32)
    probs = run_model(make_session(path), info, inputs)  # 6 images: one full batch and a padded one
    scores = inputs.mean(axis=(2, 3)) @ weight
    expected = np.exp(scores[:, 1:] - scores[:, 1:].max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert probs.shape == (6, 1000)
    assert np.allclose(probs, expected, atol=1e-5)


def test_unusable_models_fail_with_one_sentence(tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="not an ONNX model"):
        ModelInfo.from_path(not_onnx)
    flat = tmp_path / "flat.onnx"
    tiny_classifier(str(flat), batch=None, shape=(3, 224))  # rank-3 input
    with pytest.raises(ModelError, match=r"expected \[N, 3, H, W\]"):
        ModelInfo.from_path(flat)


@pytest.mark.subprocess
def test_cli_reports_a_bad_model_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = run_cli("evaluate", "--model", str(bad), "--data", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "not an ONNX model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.subprocess
def test_cli_evaluate_writes_metrics_and_table(tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 40)
    result = run_cli("evaluate", "--model", str(need(MOBILENET_INT8)), "--data", str(folder),
                     "--preset", "torch", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == metrics["evaluated"] == 40
    assert "top-1" in result.stdout and f"{100 * metrics['top1']:.2f}%" in result.stdout
    # where the time went: every stage measured itself, and the command's start-up is counted from its start
    time = metrics["time"]
    assert set(time["cpu_s_per_image"]) == {"read", "decode", "normalize", "inference", "rest"}
    assert all(time["cpu_s_per_image"][stage] > 0 for stage in ("read", "decode", "normalize", "inference"))
    assert 0 < time["ray_start_s"] < time["first_prediction_s"] < metrics["wall_s"] + 10
    assert "CPU ms per image: read" in result.stderr
    # neither Ray's notice on every local start nor its advice for an input of one block (40 images)
    assert "Token authentication is enabled" not in result.stderr and "Warning" not in result.stderr


@pytest.mark.subprocess
def test_cli_evaluate_of_a_tar_gz_with_the_50k_ground_truth_file(tmp_path):
    """A .tar.gz is read whole by one task, which needs all 50,000 labels of the ground-truth file:
    they reach it through the object store, without Ray's warning about a large read function."""
    ground_truth = need(SHARED / "data" / "imagenet" / "val_labels.txt")
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 40)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        for image in sorted(folder.glob("*.JPEG")):
            archive.add(image.resolve(), image.name)
    result = run_cli("evaluate", "--model", str(need(MOBILENET_INT8)), "--data", str(tmp_path / "images.tar.gz"),
                     "--labels", str(ground_truth), "--preset", "torch", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == metrics["evaluated"] == 40 and metrics["top1"] >= 0.6
    assert "serialized size" not in result.stderr


@pytest.mark.subprocess
def test_a_damaged_parquet_shard_is_named_before_the_run(tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 4)
    write_parquet_shards(str(folder), str(tmp_path / "shards"), shard_size=2)
    (tmp_path / "shards" / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    result = run_cli("evaluate", "--model", str(need(MOBILENET_INT8)), "--data", str(tmp_path / "shards"),
                     "--preset", "torch", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "part-00001.parquet: not a readable Parquet file" in result.stderr


@pytest.mark.subprocess
def test_cli_evaluate_without_a_model_uses_efficientnet_lite0(tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 16)
    result = run_cli("evaluate", "--data", str(folder), "--output", str(tmp_path / "out"),
                     extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"].endswith("efficientnet-lite0-fp32.onnx") and metrics["preset"] == "tf127"
    assert metrics["evaluated"] == 16 and metrics["top1"] >= 0.6  # a real ImageNet model, not random
    assert (tmp_path / "cache" / "int8-imagenet-pipeline" / "efficientnet-lite0-fp32.onnx").is_file()


def test_a_labels_file_that_is_absent_is_named(tmp_path):
    from pipeline.sources.base import Cut, SourceError
    from pipeline.sources.folder import list_folder_records
    from pipeline.sources.tar import plan_tar

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    with tarfile.open(tmp_path / "shard.tar", "w") as shard:
        shard.add(tmp_path / "a.jpg", "a.jpg")
    def plan_tar_shards(path: str, labels: str):
        return plan_tar(path, labels, Cut())

    for read, path in ((list_folder_records, tmp_path), (plan_tar_shards, tmp_path / "shard.tar")):
        with pytest.raises(SourceError, match="absent.txt: labels file not found"):
            read(str(path), str(tmp_path / "absent.txt"))
    (tmp_path / "shard.tar").unlink()
    assert list_folder_records(tmp_path) == [("a.jpg", -1)]  # a folder's own labels.txt is optional
