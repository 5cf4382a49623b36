"""`pipeline label` end to end: real Ray, the real int8 MobileNetV2, real images, folders and tar shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import MOBILENET_INT8, RESNET50_INT8, SAMPLE_1000, jpeg_bytes, need, start_cli, subset_folder
from pipeline.classes import imagenet_classes
from pipeline.evaluate import evaluate
from pipeline.label import AlreadyFinished, label
from pipeline.output import OutputDirError
from pipeline.sources import FORMATS, UNIT_FORMATS, read_work_units
from pipeline.sources.base import Cut, SourceError, read_task_split, read_task_target, shard_unit_id, walk_files
from pipeline.sources.datasource import PieceDatasource
from pipeline.sources.folder import plan_folder
from pipeline.sources.tar import plan_tar
from pipeline.writers.parquet import write_parquet_shards

TENCH = "n01440764_tench.JPEG"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_tar_shards(folder: Path, files: list[Path], per_shard: int) -> Path:
    """FILES in shards of PER_SHARD members under FOLDER, WebDataset-style (flat member names)."""
    for shard, start in enumerate(range(0, len(files), per_shard)):
        write_tar(folder / f"shard-{shard:04d}.tar", [(f.name, f.read_bytes()) for f in files[start:start + per_shard]])
    return folder


def read_output(output: Path) -> tuple[dict[str, dict], dict[str, str], dict]:
    """labels by key, error reasons by key, manifest; asserting that no key appears twice."""
    labelled = pq.read_table(output / "labels").to_pylist()
    errors = pq.read_table(output / "errors").to_pylist()
    keys = [row["key"] for row in labelled + errors]
    assert len(keys) == len(set(keys)), "a key appears twice in the output"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["images"] == manifest["labelled"] + manifest["errors"] == len(keys)
    assert (manifest["labelled"], manifest["errors"]) == (len(labelled), len(errors))
    assert sum(s["labelled"] + s["errors"] for s in manifest["shards"].values()) == len(keys)
    return {r["key"]: r for r in labelled}, {r["key"]: r["reason"] for r in errors}, manifest


@pytest.fixture(scope="module")
def sample_40(tmp_path_factory) -> Path:
    """40 full-resolution ImageNet photographs (the tench first), with their labels.txt."""
    return subset_folder(need(SAMPLE_1000), tmp_path_factory.mktemp("sample") / "images", 40)


def test_folder_and_tar_shards_give_the_top1_of_evaluate_with_class_names(ray_local, sample_40, tmp_path):
    model = str(need(MOBILENET_INT8))
    evaluate(model, str(sample_40), "torch", str(tmp_path / "evaluate"))
    evaluated = {row["key"]: row["top5_ids"][0]
                 for row in pq.read_table(tmp_path / "evaluate" / "predictions.parquet").to_pylist()}
    images = sorted(sample_40.glob("*.JPEG"))
    # the same images one directory deeper in the folder, and as tar shards of 15
    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    for image in images:
        (nested / "a" / "b" / image.name).symlink_to(image)
    tars = write_tar_shards(tmp_path / "tars", images, 15)

    label(model, str(nested), str(tmp_path / "folder"), unit_size=16)
    label(model, str(tars), str(tmp_path / "tar"))
    from_folder, folder_errors, folder_manifest = read_output(tmp_path / "folder")
    from_tar, tar_errors, tar_manifest = read_output(tmp_path / "tar")

    assert folder_errors == tar_errors == {}
    assert set(from_folder) == {f"a/b/{image.name}" for image in images}
    assert set(from_tar) == {f"shard-{i // 15:04d}.tar/{image.name}" for i, image in enumerate(images)}
    assert len(folder_manifest["shards"]) == 3 and len(tar_manifest["shards"]) == 3
    classes = imagenet_classes()
    for predictions in (from_folder, from_tar):
        for key, row in predictions.items():
            top1 = row["class_ids"][0]
            assert top1 == evaluated[key.rsplit("/", 1)[1]], key
            assert row["synsets"][0] == classes.synsets[top1] and row["names"][0] == classes.names[top1]
            assert row["probs"] == sorted(row["probs"], reverse=True)
    tench = from_tar[f"shard-0000.tar/{TENCH}"]
    assert (tench["names"][0], tench["synsets"][0]) == ("tench", "n01440764")
    assert from_folder[f"a/b/{TENCH}"]["names"][0] == "tench"


def test_probabilities_are_a_softmax_over_all_1000_classes(ray_local, sample_40, tmp_path):
    shards = tmp_path / "shards"
    write_parquet_shards(str(sample_40), str(shards), shard_size=3)
    manifest = label(str(need(MOBILENET_INT8)), str(shards), str(tmp_path / "out"), top_k=1000)
    assert manifest["format"] == "parquet" and len(manifest["shards"]) == 14
    predictions, errors, _ = read_output(tmp_path / "out")
    assert len(predictions) == 40 and not errors
    for row in predictions.values():
        assert sorted(row["class_ids"]) == list(range(1000))
        assert abs(sum(row["probs"]) - 1.0) < 1e-4


def test_a_large_parquet_shard_is_labelled_in_units_of_its_row_groups(ray_local, sample_40, tmp_path):
    """A shard of 40 rows in row groups of 8 is cut into units of at most --shard-size (16) rows at its
    row groups: three units, read in parallel and committed one by one; every image exactly once."""
    write_parquet_shards(str(sample_40), str(tmp_path / "prepared"), shard_size=40)
    (prepared,) = (tmp_path / "prepared").glob("*.parquet")
    big = tmp_path / "shards" / "big.parquet"
    big.parent.mkdir()
    pq.write_table(pq.read_table(prepared), big, row_group_size=8)
    # three units, fewer than the cluster has room for tasks: preprocessed in re-cut blocks
    assert read_work_units(str(big.parent), None, set(), 16).recut_rows == read_task_split(40)[0]
    manifest = label(str(need(MOBILENET_INT8)), str(big.parent), str(tmp_path / "out"), unit_size=16)
    assert sorted(shard["labelled"] for shard in manifest["shards"].values()) == [8, 16, 16]
    predictions, errors, _ = read_output(tmp_path / "out")
    assert sorted(predictions) == sorted(pq.read_table(prepared, columns=["key"])["key"].to_pylist())
    assert not errors and manifest["images"] == manifest["labelled"] == 40


def test_one_big_tar_is_labelled_in_units_of_its_members_and_resumed_by_unit(ray_local, sample_40, tmp_path):
    """A tar of 40 images is cut into units of at most --shard-size (16) members at their headers:
    three units, read in parallel and committed one by one, every image exactly once. A lost unit is the
    only one a resume redoes, and the shard is cut as before even once shards added to the input are
    enough for a unit each (which are then not scanned)."""
    files = sorted(sample_40.glob("*.JPEG"))
    write_tar(tmp_path / "archive" / "big.tar", [(f.name, f.read_bytes()) for f in files])
    model, output = str(need(MOBILENET_INT8)), tmp_path / "out"
    manifest = label(model, str(tmp_path / "archive"), str(output), unit_size=16)
    assert {unit.rsplit("-", 1)[1]: shard["labelled"] for unit, shard in manifest["shards"].items()} == \
        {"m000000000": 16, "m000000016": 16, "m000000032": 8}
    before = read_output(output)[:2]
    assert sorted(before[0]) == [f"big.tar/{f.name}" for f in files] and not before[1]

    (output / "manifest.json").unlink()
    (middle,) = (output / "labels").glob("*-m000000016.parquet")
    middle.unlink()
    added = [f"small-{n:02d}.tar" for n in range(read_task_target())]
    for n, name in enumerate(added):
        write_tar(tmp_path / "archive" / name, [("a.jpg", jpeg_bytes(seed=n)), ("b.jpg", jpeg_bytes(seed=n + 50))])
    resumed = label(model, str(tmp_path / "archive"), str(output), unit_size=16, resume=True)
    assert resumed["resumed_from"] == 24 and resumed["this_run_images"] == 16 + 2 * len(added)
    predictions, errors, manifest = read_output(output)
    assert {key: row for key, row in predictions.items() if key.startswith("big.tar/")} == before[0]
    assert len(predictions) == 40 + 2 * len(added) and not errors
    assert len(manifest["shards"]) == 3 + len(added)  # a unit per added shard, not scanned


def test_a_part_labelled_shard_that_cannot_be_cut_again_is_refused_not_relabelled(tmp_path):
    """A resume finds a shard whose first part is done but whose headers no longer read (replaced, or
    unreadable): reading it whole would label that part again, so the run stops and says why."""
    big = write_tar(tmp_path / "big.tar", [(f"{i}.jpg", jpeg_bytes(seed=i)) for i in range(40)])
    plan = plan_tar(str(big), None, Cut(16))
    readers, records = plan.pieces, plan.records
    assert (len(readers), records) == (3, 40)
    big.write_bytes(b"no longer a tar archive" * 100)
    with pytest.raises(SourceError, match="big.tar: an earlier run into this output labelled it in parts"):
        plan_tar(str(big), None, Cut(16, frozenset({shard_unit_id(str(big)) + "-m000000000"})))


def test_a_name_that_is_not_utf8_is_labelled_under_an_escaped_key(ray_local, tmp_path):
    """A file or tar member named in Latin-1 (`caf\xe9.jpg` as bytes) is labelled like any other, its key
    written with a backslash escape: Arrow stores only UTF-8, and the read must not fail."""
    name = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / name).write_bytes(jpeg_bytes(seed=7))
    (tmp_path / "folder" / "plain.jpg").write_bytes(jpeg_bytes(seed=8))
    write_tar(tmp_path / "tars" / "s.tar", [(name, jpeg_bytes(seed=7)), ("plain.jpg", jpeg_bytes(seed=8))])
    model = str(need(MOBILENET_INT8))
    for data, prefix in ((tmp_path / "folder", ""), (tmp_path / "tars", "s.tar/")):
        label(model, str(data), str(tmp_path / f"out-{data.name}"))
        labelled, errors, _ = read_output(tmp_path / f"out-{data.name}")
        assert sorted(labelled) == [prefix + "caf\\xe9.jpg", prefix + "plain.jpg"] and not errors


def bad_files() -> dict[str, bytes]:
    """Three decodable images and one file of every kind that cannot be labelled."""
    return {
        "good-1.jpg": jpeg_bytes(seed=1), "good-2.png": jpeg_bytes(seed=2, fmt="PNG"),
        "deeper/good-3.jpg": jpeg_bytes(seed=3, mode="L"),
        "empty.jpg": b"",
        "truncated.jpg": jpeg_bytes(size=(400, 300), seed=4)[:700],
        "corrupt.jpg": jpeg_bytes(seed=5)[:20] + bytes(np.random.default_rng(5).integers(0, 256, 3000, np.uint8)),
        "notes.txt": b"not an image",
        "deeper/meta.json": b'{"class": 3}',
    }


def write_bad_files(folder: Path) -> Path:
    """FOLDER holding `bad_files()`."""
    for name, data in bad_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


EXPECTED_REASONS = {
    "empty.jpg": "empty image", "truncated.jpg": "truncated or corrupt", "corrupt.jpg": "not a recognised image",
    "notes.txt": "not a recognised image format", "deeper/meta.json": "not a recognised image format",
}


def test_bad_files_in_a_folder_and_in_tars_are_error_rows_and_the_counts_add_up(ray_local, tmp_path):
    files = bad_files()
    folder = write_bad_files(tmp_path / "folder")
    tars = tmp_path / "tars"
    write_tar(tars / "shard-0.tar", list(files.items()))
    whole = write_tar(tmp_path / "whole.tar", [(f"x{i}.jpg", jpeg_bytes(size=(300, 300), seed=i)) for i in range(3)])
    (tars / "shard-1-truncated.tar").write_bytes(whole.read_bytes()[:1800])  # cut inside the first member's data
    (tars / "shard-2-not-a-tar.tar").write_bytes(b"this is not a tar archive" * 40)
    (tars / "shard-3-empty.tar").write_bytes(b"")
    write_tar(tars / "shard-4-of-tars.tar", [("n01440764.tar", whole.read_bytes())])  # as ILSVRC2012_img_train.tar

    model = str(need(MOBILENET_INT8))
    label(model, str(folder), str(tmp_path / "out-folder"))
    label(model, str(tars), str(tmp_path / "out-tar"))
    folder_labels, folder_errors, folder_manifest = read_output(tmp_path / "out-folder")
    tar_labels, tar_errors, tar_manifest = read_output(tmp_path / "out-tar")

    assert set(folder_labels) == {"good-1.jpg", "good-2.png", "deeper/good-3.jpg"}
    assert set(folder_errors) == set(EXPECTED_REASONS)
    assert folder_manifest["images"] == len(files)
    assert set(tar_labels) == {f"shard-0.tar/{name}" for name in folder_labels}
    for name, reason in EXPECTED_REASONS.items():
        assert reason in folder_errors[name] and reason in tar_errors[f"shard-0.tar/{name}"]
        assert folder_errors[name] == tar_errors[f"shard-0.tar/{name}"]
    assert "cut short" in tar_errors["shard-1-truncated.tar/x0.jpg"]
    assert "not a readable tar archive" in tar_errors["shard-2-not-a-tar.tar"]
    assert "not a readable tar archive" in tar_errors["shard-3-empty.tar"]
    assert "extract the outer archive" in tar_errors["shard-4-of-tars.tar/n01440764.tar"]
    assert tar_manifest["images"] == len(files) + 4 and tar_manifest["errors"] == len(EXPECTED_REASONS) + 4


def start_label(*args: str) -> subprocess.Popen:
    return start_cli("label", "--preset", "torch", *args)


@pytest.mark.subprocess
def test_a_finished_dir_is_left_alone_and_a_foreign_one_refused(ray_local, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    model, output = str(need(MOBILENET_INT8)), tmp_path / "out"
    first = label(model, str(folder), str(output))
    (output / "manifest.json").unlink()  # as if killed after the last shard, before the manifest
    assert label(model, str(folder), str(output), resume=True)["this_run_images"] == 0
    shards = {p: p.stat().st_mtime_ns for p in output.rglob("*.parquet")}
    with pytest.raises(AlreadyFinished):
        label(model, str(folder), str(output), resume=True)
    done = start_label("--model", model, "--data", str(folder), "--output", str(output))
    message = " ".join(done.communicate(timeout=120)[0].split())  # rich wraps lines at 80 columns
    assert done.returncode == 0 and "already holds a finished labelling run (3 images" in message
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.parquet")} == shards
    again = label(model, str(folder), str(output), overwrite=True)
    assert again["images"] == first["images"] == 3 and again["this_run_images"] == 3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    refused = start_label("--model", model, "--data", str(folder), "--output", str(foreign))
    message = " ".join(refused.communicate(timeout=120)[0].split())
    assert refused.returncode == 2 and "is not empty and holds no finished run" in message
    with pytest.raises(OutputDirError, match="no labelling run to resume"):
        label(model, str(folder), str(foreign), resume=True)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]



@pytest.mark.subprocess
def test_a_finished_or_interrupted_run_refuses_other_settings_and_resumes_the_same(ray_local, tmp_path):
    images = subset_folder(need(SAMPLE_1000), tmp_path / "images", 6)
    tars = write_tar_shards(tmp_path / "tars", sorted(images.glob("*.JPEG")), per_shard=4)
    model = tmp_path / "model.onnx"  # a copy, so that the test can replace it in place
    shutil.copyfile(need(MOBILENET_INT8), model)
    other_model, output = str(need(RESNET50_INT8)), tmp_path / "out"
    label(str(model), str(tars), str(output))
    written = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}

    refused = start_label("--model", other_model, "--data", str(tars), "--output", str(output),
                          "--top-k", "3", "--preset", "caffe2")
    message = " ".join(refused.communicate(timeout=120)[0].split())
    assert refused.returncode == 2 and "holds a finished labelling run with other settings" in message
    for changed in (f"model was '{model}', now '{other_model}'", "top_k was 5, now 3",
                    "preset was 'torch', now 'caffe2'", "pass a new --output, or --overwrite"):
        assert changed in message
    with pytest.raises(OutputDirError, match="finished labelling run with other settings .*top_k was 5, now 3"):
        label(str(model), str(tars), str(output), top_k=3)
    with pytest.raises(OutputDirError, match=f"data was '{tars}', now '{images}'"):
        label(str(model), str(images), str(output))
    with pytest.raises(AlreadyFinished):
        label(str(model), str(tars), str(output))

    (output / "manifest.json").unlink()  # as if killed after the last shard, before the manifest
    with pytest.raises(OutputDirError, match="interrupted run with other settings .*top_k was 5, now 3"):
        label(str(model), str(tars), str(output), top_k=3, resume=True)
    with pytest.raises(OutputDirError, match="interrupted run with other settings .*model was"):
        label(other_model, str(tars), str(output), resume=True)
    shutil.copyfile(other_model, model)  # another model under the same path: its bytes tell them apart
    with pytest.raises(OutputDirError, match="interrupted run with other settings .*model_sha256 was"):
        label(str(model), str(tars), str(output), resume=True)
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == \
        {p: t for p, t in written.items() if p.name != "manifest.json"}
    shutil.copyfile(need(MOBILENET_INT8), model)
    run = json.loads((output / "run.json").read_text())
    (output / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "model_sha256"}))
    with pytest.raises(OutputDirError, match="model_sha256 was not recorded"):  # a run of an older version
        label(str(model), str(tars), str(output), resume=True)
    (output / "run.json").write_text(json.dumps(run))

    resumed = label(str(model), str(tars), str(output), resume=True)
    assert resumed["this_run_images"] == 0 and resumed["images"] == 6 and len(resumed["shards"]) == 2


@pytest.mark.subprocess
def test_an_empty_folder_fails_as_in_evaluate_and_records_no_run(ray_local, tmp_path):
    model, folder, output = str(need(MOBILENET_INT8)), tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SourceError, match="no files to read"):
        evaluate(model, str(folder), "torch")
    failed = start_label("--model", model, "--data", str(folder), "--output", str(output))
    message = " ".join(failed.communicate(timeout=120)[0].split())
    assert failed.returncode == 2 and f"{folder}: no files to read" in message
    assert not output.exists() or not any(output.iterdir())
    empty_tar = write_tar(tmp_path / "tars" / "empty.tar", [])
    with pytest.raises(SourceError, match="no records to read"):
        label(model, str(empty_tar.parent), str(output))
    assert not any(output.iterdir())

    for name in sorted(line.split()[0] for line in (need(SAMPLE_1000) / "labels.txt").read_text().splitlines())[:3]:
        (folder / name).symlink_to(SAMPLE_1000 / name)
    manifest = label(model, str(folder), str(output))
    assert manifest["images"] == manifest["labelled"] == manifest["this_run_images"] == 3


@pytest.mark.subprocess
def test_sigkill_part_way_then_resume_gives_exactly_the_uninterrupted_output(ray_local, tmp_path):
    model = str(need(MOBILENET_INT8))
    tars = tmp_path / "tars"
    for shard in range(12):
        write_tar(tars / f"{shard:03d}.tar",
                  [(f"{shard:03d}/{i:02d}.jpg", jpeg_bytes(size=(96, 72), seed=100 * shard + i)) for i in range(16)]
                  + ([("broken.jpg", b"\xff\xd8 broken")] if shard == 5 else []))
    killed = tmp_path / "killed"
    run = start_label("--model", model, "--data", str(tars), "--output", str(killed))
    deadline = time.monotonic() + 300
    while len(list((killed / "labels").glob("*.parquet"))) < 2:
        assert run.poll() is None, "the run ended before it could be killed: " + run.stdout.read()
        assert time.monotonic() < deadline, "no output shard after 300 s"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the driver and the Ray it started
    run.wait()
    assert not (killed / "manifest.json").exists()
    committed = len(list((killed / "labels").glob("*.parquet")))
    assert 2 <= committed < 12

    resumed = label(model, str(tars), str(killed), resume=True)
    assert resumed["resumed_from"] >= 2 * 16 and resumed["this_run_images"] < 12 * 16 + 1
    label(model, str(tars), str(tmp_path / "whole"))
    after_kill, errors_after_kill, manifest = read_output(killed)
    uninterrupted, errors_uninterrupted, _ = read_output(tmp_path / "whole")
    assert manifest["images"] == 12 * 16 + 1 and len(manifest["shards"]) == 12
    assert after_kill.keys() == uninterrupted.keys() and errors_after_kill == errors_uninterrupted
    assert list(errors_after_kill) == ["005.tar/broken.jpg"]
    for key, row in after_kill.items():
        assert row["class_ids"] == uninterrupted[key]["class_ids"], key
        assert np.allclose(row["probs"], uninterrupted[key]["probs"], atol=1e-6), key


def test_a_format_without_a_partitioner_lmdb_is_labelled_whole_as_one_unit(ray_local, tmp_path):
    """Any format registered in FORMATS works: LMDB (raw-pixel Caffe2 records here) is read through
    read_source as the one unit "all"."""
    from pipeline.writers.lmdb import write_lmdb

    assert "lmdb" not in UNIT_FORMATS
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i, size=(80, 60)))
    assert write_lmdb(str(folder), str(tmp_path / "db"), fmt="lmdb-caffe2", encoded=False)["records"] == 4
    model, output = str(need(MOBILENET_INT8)), tmp_path / "out"
    totals = set()
    label(model, str(tmp_path / "db"), str(output), on_progress=lambda done, total: totals.add(total))
    assert totals == {4}  # the progress bar's total: the database's entries
    predictions, errors, manifest = read_output(output)
    assert sorted(predictions) == [f"{i:08d}_{i}.jpg" for i in range(4)] and not errors
    assert manifest["format"] == "lmdb" and list(manifest["shards"]) == ["all"] and not manifest["partitioned"]
    (output / "manifest.json").unlink()
    assert label(model, str(tmp_path / "db"), str(output), resume=True)["this_run_images"] == 0

def test_the_progress_total_is_known_for_every_format_that_counts_cheaply(sample_40, tmp_path):
    """Parquet and tar work units count their records as they are planned (footers, member headers),
    only the units still to do on a resume, and so does an image folder (listed on the driver); tar
    shards enough for a unit each (not scanned to be cut) are counted in the background."""
    from pipeline.label import RecordCount

    files = sorted(sample_40.glob("*.JPEG"))
    write_parquet_shards(str(sample_40), str(tmp_path / "shards"), shard_size=15)
    write_tar_shards(tmp_path / "tars", files, per_shard=15)
    write_tar(tmp_path / "big.tar", [(f.name, f.read_bytes()) for f in files])
    for fmt, path in [("parquet", tmp_path / "shards"), ("tar", tmp_path / "tars"), ("tar", tmp_path / "big.tar")]:
        plan = FORMATS[fmt](str(path), None, Cut(16))
        readers, records = plan.pieces, plan.records
        assert records == 40 and len(readers) == 3, path
    first_shard = shard_unit_id(str(tmp_path / "tars" / "shard-0000.tar"))
    assert plan_tar(str(tmp_path / "tars"), None, Cut(16, frozenset({first_shard}))).records == 25
    for n in range(3, read_task_target()):  # enough shards for a task each: not scanned, so not counted
        write_tar(tmp_path / "tars" / f"shard-{n:04d}.tar", [("x.jpg", b"x")])
    assert plan_tar(str(tmp_path / "tars"), None, Cut(16)).records is None
    count = RecordCount(str(tmp_path / "tars"), "tar", None)  # then counted in the background
    count.thread.join(timeout=60)
    assert count.value == 40 + read_task_target() - 3
    assert plan_folder(str(sample_40), None, Cut(16)).records == 40  # listed once on the driver


def test_folder_units_cover_every_file_once_across_read_tasks(tmp_path):
    names = [f"{d}/{i}.jpg" for d in ("a", "a/z", "b", "c/d/e") for i in range(4)] + ["top.jpg", ".hidden.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "labels.txt").write_text("top.jpg 1\n")
    visible = sorted(n for n in names if not n.startswith("."))
    assert sorted(walk_files(tmp_path)) == visible and list(walk_files(tmp_path)) == list(walk_files(tmp_path))

    def read_all(done: set[str]) -> dict[str, list[str]]:
        units: dict[str, list[str]] = {}
        for reader in PieceDatasource(plan_folder(str(tmp_path), None, Cut(5, frozenset(done)))).task_pieces():
            for unit, blocks in ((piece.id, piece.read()) for piece in reader):
                assert unit not in units
                units[unit] = [key for block in blocks for key in block.column("key").to_pylist()]
        return units

    units = read_all(set())
    assert len(units) == 4 and sorted(k for keys in units.values() for k in keys) == visible
    for keys in units.values():
        for key in keys:
            assert (tmp_path / key).read_bytes() == key.encode()
    ids = sorted(units)
    assert [unit.rsplit("-", 1)[0] for unit in ids] == [f"files-{n:08d}" for n in range(4)]
    assert read_all({ids[1], ids[3]}).keys() == {ids[0], ids[2]}


def test_a_resume_over_a_folder_changed_among_its_finished_units_is_refused(ray_local, tmp_path):
    """Units are runs of the walk: a file added before the end of the finished units would shift
    them, and the resume would label files twice and skip others. It is refused before anything
    runs; a file added after them is labelled, every file once."""
    folder = write_bad_files(tmp_path / "folder")
    model, output = str(need(MOBILENET_INT8)), tmp_path / "out"
    label(model, str(folder), str(output), unit_size=3)
    # as if killed after the first unit: the units after it are not done
    (output / "manifest.json").unlink()
    first, *later = sorted((output / "labels").glob("*.parquet"))
    for shard in later:
        shard.unlink()
        (output / "errors" / shard.name).unlink()
    (folder / "0-added-first.jpg").write_bytes(b"not an image")  # sorts into the finished unit
    with pytest.raises(SourceError, match="the folder changed since the interrupted run into this output: 1 of its 1 "):
        label(model, str(folder), str(output), unit_size=3, resume=True)
    assert sorted((output / "labels").glob("*.parquet")) == [first]  # left as it was
    (folder / "0-added-first.jpg").rename(folder / "zz-added-last.jpg")  # sorts after it
    resumed = label(model, str(folder), str(output), unit_size=3, resume=True)
    labelled, errors, manifest = read_output(output)
    assert manifest["images"] == len(bad_files()) + 1 and resumed["resumed_from"] == 3
    assert "zz-added-last.jpg" in errors and "0-added-first.jpg" not in errors


def test_resume_drops_half_written_files_and_redoes_only_those_units(ray_local, tmp_path):
    folder = write_bad_files(tmp_path / "folder")
    model, output = str(need(MOBILENET_INT8)), tmp_path / "out"
    label(model, str(folder), str(output), unit_size=3)
    before = read_output(output)[:2]
    # as if killed between a unit's two renames, and while writing another unit
    (output / "manifest.json").unlink()
    units = sorted(shard.name for shard in (output / "labels").glob("*.parquet"))
    (output / "labels" / units[1]).unlink()
    (output / "errors" / units[2]).rename(output / "errors" / f".{units[2]}.tmp")
    (output / "labels" / units[2]).rename(output / "labels" / f".{units[2]}.tmp")
    resumed = label(model, str(folder), str(output), unit_size=3, resume=True)
    assert resumed["resumed_from"] == 3 and resumed["this_run_images"] == 5
    assert read_output(output)[:2] == before
    assert not list(output.rglob(".*.tmp"))
