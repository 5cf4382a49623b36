"""Input detection, labels files and the checks made before Ray starts: real files in tmp_path, real
ImageNet JPEGs, real Ray and the real int8 MobileNetV2 where records are read."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import MOBILENET_INT8, REPO, SAMPLE_1000, need, subset_folder
from pipeline.evaluate import evaluate
from pipeline.label import label
from pipeline.sources import check_source, detect_format, read_source
from pipeline.sources.base import NO_LABEL, Cut, SourceError, read_task_split, read_task_target
from pipeline.sources.datasource import PieceDatasource
from pipeline.sources.labels import read_labels_file
from pipeline.sources.tar import WHOLE_SHARD, input_shards, plan_tar, scan_shard, tar_records, tar_shards
from pipeline.writers.parquet import write_parquet_shards

NOT_A_SHARD = "not a tar shard (its name does not end in .tar, .tar.gz or .tgz)"


def tar_of(path: Path, images: list[Path]) -> Path:
    """A shard of IMAGES as `tar -C DIR -cf PATH .` writes it: member names start with `./`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for image in images:
            archive.add(image.resolve(), f"./{image.name}")  # the JPEG, not subset_folder's link
    return path


@pytest.fixture(scope="module")
def sample_8(tmp_path_factory) -> Path:
    return subset_folder(need(SAMPLE_1000), tmp_path_factory.mktemp("sample") / "images", 8)


@pytest.fixture
def nested_shards(sample_8, tmp_path) -> Path:
    """Two shards in subfolders, a README next to them, a hidden file and a labels.txt keyed by shard."""
    images = sorted(sample_8.glob("*.JPEG"))
    root = tmp_path / "nested"
    tar_of(root / "part1" / "shard-aa.tar", images[:5])
    tar_of(root / "part2" / "shard-ab.tar", images[5:])
    (root / "README.txt").write_text("shards of the sample\n")
    (root / ".DS_Store").write_bytes(b"\0" * 8)
    labels = dict(line.split() for line in (sample_8 / "labels.txt").read_text().splitlines())
    (root / "labels.txt").write_text("".join(
        f"{'part1/shard-aa.tar' if i < 5 else 'part2/shard-ab.tar'}/{image.name} {labels[image.name]}\n"
        for i, image in enumerate(images)))
    return root


def test_a_tree_of_tar_shards_is_tar_and_a_tree_with_images_too_is_refused(nested_shards, sample_8, tmp_path):
    assert detect_format(str(nested_shards)) == "tar"
    flat = tmp_path / "flat"
    tar_of(flat / "shard-0.tar", sorted(sample_8.glob("*.JPEG"))[:2])
    (flat / "README.txt").write_text("two images\n")
    assert detect_format(str(flat)) == "tar"
    (flat / ".hidden.tar").write_bytes(b"")  # hidden files decide nothing
    assert detect_format(str(sample_8)) == "folder"
    (flat / "deeper").mkdir()
    (flat / "deeper" / "stray.jpg").write_bytes((sample_8 / "labels.txt").read_bytes())
    with pytest.raises(SourceError, match=r"holds both image files \(deeper/stray.jpg\) and .tar shards "
                                          r"\(shard-0.tar\); pass --format folder or --format tar"):
        detect_format(str(flat))
    # with --format tar the image is one error row like the README, and the count agrees
    assert [prefix for _, prefix in tar_shards(str(flat))] == ["README.txt/", "deeper/stray.jpg/", "shard-0.tar/"]
    assert plan_tar(str(flat), None, Cut(1000)).records == 4


def test_a_labels_file_among_the_shards_is_not_a_record(nested_shards):
    labels = nested_shards / "part1" / "val.txt"
    labels.write_text((nested_shards / "labels.txt").read_text())
    shards = [prefix for _, prefix in input_shards(str(nested_shards), str(labels))]
    assert shards == ["README.txt/", "part1/shard-aa.tar/", "part2/shard-ab.tar/"]


def test_nested_shards_are_evaluated_and_labelled_with_every_file_accounted_for(ray_local, nested_shards, tmp_path):
    model = str(need(MOBILENET_INT8))
    expected = {line.split()[0] for line in (nested_shards / "labels.txt").read_text().splitlines()}
    metrics = evaluate(model, str(nested_shards), "torch", str(tmp_path / "eval"),
                       labels=str(nested_shards / "labels.txt"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (9, 8, 1)
    rows = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert {r["key"] for r in rows if not r["error"]} == expected
    assert {r["key"]: r["error"] for r in rows if r["error"]} == {"README.txt": NOT_A_SHARD}

    manifest = label(model, str(nested_shards), str(tmp_path / "labels"))
    assert manifest["format"] == "tar" and (manifest["images"], manifest["labelled"], manifest["errors"]) == (9, 8, 1)
    assert plan_tar(str(nested_shards), None, Cut(1000)).records == manifest["images"]
    labelled = pq.read_table(tmp_path / "labels" / "labels").column("key").to_pylist()
    assert sorted(labelled) == sorted(expected)
    assert pq.read_table(tmp_path / "labels" / "errors").to_pylist() == [{"key": "README.txt", "reason": NOT_A_SHARD}]


def test_labels_file_keys_are_normalised_as_the_keys_of_the_sources(ray_local, sample_8, tmp_path):
    folder = subset_folder(sample_8, tmp_path / "images", 3)
    lines = (folder / "labels.txt").read_text().splitlines()
    # as `find .` writes them, one name with a doubled slash and one without a prefix; and a missing file
    (folder / "labels.txt").write_text(f"./{lines[0]}\n.//{lines[1]}\n{lines[2]}\n./gone/../missing.JPEG 7\n")
    metrics = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (4, 3, 1)
    rows = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted([line.split()[0] for line in lines] + ["missing.JPEG"])
    assert {r["key"]: r["error"] for r in rows if r["error"]} == {"missing.JPEG": "file not found"}

    (folder / "labels.txt").write_text(f"{lines[0]}\n./{lines[0]}\n")
    with pytest.raises(SourceError, match=rf"labels.txt:2: {lines[0].split()[0]} is listed twice "
                                          rf"\(here as \./{lines[0].split()[0]}\)"):
        read_labels_file(folder / "labels.txt")


def test_labels_files_as_editors_and_file_systems_write_them(ray_local, sample_8, tmp_path):
    """A byte-order mark (Windows editors) is skipped; names that are not UTF-8 (`find .` on a Latin-1
    file system) match their files; a class index of other digits, or too large for the label column,
    is named with its line, not a traceback."""
    folder = subset_folder(sample_8, tmp_path / "images", 2)
    first, second = (folder / "labels.txt").read_text().splitlines()
    os.rename(folder / second.split()[0], os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"))
    (folder / "labels.txt").write_bytes(b"\xef\xbb\xbf" + f"{first}\r\n".encode() + b"caf\xe9.JPEG "
                                        + second.split()[1].encode() + b"\r\n")
    metrics = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (2, 2, 0)
    keys = pq.read_table(tmp_path / "out" / "predictions.parquet").column("key").to_pylist()
    assert sorted(keys) == sorted([first.split()[0], "caf\\xe9.JPEG"])
    for index in ("\u00b2", "--5", "1" * 19, "7.0"):
        (folder / "labels.txt").write_text(f"{first}\na.JPEG {index}\n")
        with pytest.raises(SourceError, match=rf"labels.txt:2: expected 'FILE CLASS_INDEX', got 'a.JPEG {index}'"):
            read_labels_file(folder / "labels.txt")


def test_a_symlink_loop_in_an_image_folder_is_an_error_row(ray_local, sample_8, tmp_path):
    """Format detection and the folder walk asked it whether it is a file, and failed with ELOOP."""
    folder = subset_folder(sample_8, tmp_path / "images", 2)
    os.symlink("loop.jpg", folder / "loop.jpg")
    assert detect_format(str(folder)) == "folder"
    metrics = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (3, 2, 1)
    errors = {r["key"]: r["error"] for r in pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
              if r["error"]}
    assert errors == {"loop.jpg": "cannot read file: Too many levels of symbolic links"}


def test_a_single_image_is_told_what_inputs_are_accepted(sample_8):
    image = str(sorted(sample_8.glob("*.JPEG"))[0])
    with pytest.raises(SourceError, match=r"--data takes a folder of images, a .parquet file, a "
                                          r".tar/.tar.gz/.tgz shard.*an LMDB folder.*put a single image in a folder"):
        check_source(image)
    with pytest.raises(SourceError, match="not a directory: --format folder reads a folder of images"):
        check_source(image, "folder")


BEFORE_RAY = """
import json, sys
import ray
from pipeline.evaluate import evaluate
from pipeline.label import label
from pipeline.writers.parquet import write_parquet_shards
from pipeline.sources.base import SourceError

model, folder, out = sys.argv[1:4]
calls = {
    "missing data": lambda: evaluate(model, folder + "/absent", output=out),
    "unknown format": lambda: evaluate(model, folder, fmt="zip", output=out),
    "missing labels": lambda: evaluate(model, folder, labels=folder + "/absent.txt", output=out),
    "malformed labels": lambda: evaluate(model, folder, labels=folder + "/bad.txt", output=out),
    "malformed labels.txt": lambda: evaluate(model, folder + "/bad", output=out),
    "label: unknown format": lambda: label(model, folder, out, fmt="zip"),
}
errors = {}
for name, call in calls.items():
    try:
        call()
    except SourceError as exc:
        errors[name] = str(exc)
print(json.dumps({"errors": errors, "ray_started": ray.is_initialized()}))
"""


@pytest.mark.subprocess
def test_bad_inputs_are_reported_before_ray_starts(sample_8, tmp_path):
    (tmp_path / "bad.txt").write_text("a.jpg one\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels.txt").write_text("a.jpg 1\nb.jpg\n")
    for name in ("labels.txt", *(p.name for p in sorted(sample_8.glob("*.JPEG"))[:2])):
        (tmp_path / name).symlink_to(sample_8 / name)
    result = subprocess.run([sys.executable, "-c", BEFORE_RAY, str(need(MOBILENET_INT8)), str(tmp_path),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ray_started"] is False
    assert report["errors"] == {
        "missing data": f"{tmp_path}/absent: no such file or directory",
        "unknown format": "unknown input format 'zip': known formats are folder, lmdb, parquet, tar",
        "missing labels": f"{tmp_path}/absent.txt: labels file not found",
        "malformed labels": f"{tmp_path}/bad.txt:1: expected 'FILE CLASS_INDEX', got 'a.jpg one'",
        "malformed labels.txt": f"{tmp_path}/bad/labels.txt:2: expected 'FILE CLASS_INDEX', got 'b.jpg'",
        "label: unknown format": "unknown input format 'zip': known formats are folder, lmdb, parquet, tar",
    }
    assert not (tmp_path / "out").exists()


# --- one big tar read by many tasks --------------------------------------------------------------

def big_tar(path: Path, count: int) -> Path:
    """COUNT small members, every fifth behind a GNU long-name header, with a directory and a symlink."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for i in range(count):
            if i == 3:
                directory = tarfile.TarInfo("subdir")
                directory.type = tarfile.DIRTYPE
                archive.addfile(directory)
            name = ("deep/" * 25 if i % 5 == 0 else "./") + f"member-{i:04d}.jpg"
            data = bytes([i % 256]) * (100 + 37 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "member-0001.jpg"
        archive.addfile(link)
    return path


def tar_datasource(path: str, labels: Optional[str] = None) -> PieceDatasource:
    """The Datasource that `evaluate` reads the tar shards PATH names with."""
    return PieceDatasource(plan_tar(path, labels, Cut()))


def rows_of(tasks) -> list[tuple]:
    """(key, label, image, error) of every row the read tasks give, in task order."""
    return [row for task in tasks for block in task() for row in zip(*block.select(["key", "label", "image", "error"])
                                                                     .to_pydict().values())]


def test_one_big_tar_is_read_in_runs_of_its_members_each_exactly_once(tmp_path):
    """An uncompressed tar is cut into runs at member headers (long names and a directory in between),
    each run read by its own task from its first header: together they give exactly the rows of one
    whole read, labels included; damaged, the last run still reports the damage once."""
    shard = big_tar(tmp_path / "big.tar", 150)
    labels = tmp_path / "labels.txt"
    keys = [key for key, _, _ in tar_records(str(shard), "")]
    labels.write_text("".join(f"{key} {i % 1000}\n" for i, key in enumerate(keys)))
    whole = [(key, i % 1000, data, error) for i, (key, data, error) in enumerate(tar_records(str(shard), ""))]
    assert len(whole) == 151 and whole[-1][3] == "tar member is a link, not a file"
    assert whole[0][0] == "deep/" * 25 + "member-0000.jpg" and whole[1][0] == "member-0001.jpg"

    datasource = tar_datasource(str(shard), str(labels))
    assert datasource.plan.records == 151  # counted by the scan: the progress bar's total
    assert datasource.plan.recut_rows is None  # its runs are already a task's share each
    tasks = datasource.get_read_tasks(1)
    assert len(tasks) == read_task_split(151)[1] > 1
    assert rows_of(tasks) == whole

    data = shard.read_bytes()
    offsets = scan_shard(str(shard), "").offsets
    header_40, header_41, last = offsets[40], offsets[41], offsets[-1]
    for damage, rows, reason in (
            (data[:header_41 + 512 + 10], 42, "tar member cut short"),  # inside member 41's data
            # the last three: dropped without a word by tarfile alone
            (data[:header_40] + b"\x07" * 512 + data[header_40 + 512:], 41, "a damaged member header"),
            (data[:last] + b"\x07" * 512 + data[last + 512:], 151, "a damaged member header"),  # zeros after it
            (data + data, 152, "archives joined end to end")):
        damaged = tmp_path / "damaged.tar"
        damaged.write_bytes(damage)
        whole = [(key, NO_LABEL, image, error) for key, image, error in tar_records(str(damaged), "")]
        assert len(whole) == rows and reason in whole[-1][3]
        assert not any(error for _, _, _, error in whole[:-1] if "link" not in error)
        tasks = tar_datasource(str(damaged)).get_read_tasks(1)
        assert len(tasks) > 1 and rows_of(tasks) == whole

    global_header = tmp_path / "git-archive.tar"  # as `git archive` writes: a pax global header first
    with tarfile.open(global_header, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "abc123"}) as archive:
        for name, image, _ in tar_records(str(shard), ""):
            info = tarfile.TarInfo(name)
            info.size = len(image)
            archive.addfile(info, io.BytesIO(image))
    scan = scan_shard(str(global_header), "")
    assert not scan.cuttable and len(scan.offsets) == 151  # read whole, and still counted
    datasource = tar_datasource(str(global_header))
    assert len(datasource.plan.pieces) == 1 and datasource.plan.records == 151
    assert datasource.plan.recut_rows == read_task_split(151)[0]  # preprocessed in blocks all the same

    compressed = tmp_path / "big.tar.gz"
    compressed.write_bytes(gzip.compress(shard.read_bytes()))
    datasource = tar_datasource(str(compressed))
    tasks = datasource.get_read_tasks(1)
    assert len(tasks) == 1 and datasource.plan.recut_rows  # cannot be entered part-way: re-cut after reading
    assert [row[0] for row in rows_of(tasks)] == [key for key, _, _ in tar_records(str(shard), "")]
    compressed.write_bytes(gzip.compress(shard.read_bytes()) * 2)  # `cat a.tar.gz a.tar.gz`: tarfile reads one
    rows = list(tar_records(str(compressed), ""))
    assert len(rows) == 152 and "compressed archives joined end to end" in rows[-1][2]


def test_enough_shards_are_read_a_task_each_with_only_their_own_labels(sample_8, tmp_path):
    """As many shards as the cluster wants tasks: no header scan, a task per shard, and each task
    carries the labels of its own shard's members, not the whole labels file."""
    images = sorted(sample_8.glob("*.JPEG"))
    shards = {f"s{n:03d}.tar": images[n % 7:n % 7 + 2] for n in range(read_task_target())}
    for name, members in shards.items():
        tar_of(tmp_path / "shards" / name, members)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name}/{image.name} {n}\n" for n, (name, members) in enumerate(shards.items())
                              for image in members))
    datasource = tar_datasource(str(tmp_path / "shards"), str(labels))
    assert len(datasource.get_read_tasks(1)) == len(shards)
    reads = [piece.read for piece in datasource.plan.pieces]
    for n, (_, prefix, run, label_of) in enumerate((read.file, read.prefix, read.run, read.labels) for read in reads):
        assert run == WHOLE_SHARD
        assert label_of == {f"{prefix}{image.name}": n for image in shards[prefix.rstrip("/")]}


# --- Parquet as Hugging Face datasets writes it ----------------------------------------------------

def test_hugging_face_parquet_shards_give_the_folders_predictions_by_shard_and_row(ray_local, sample_8, tmp_path):
    """`image` a struct of bytes and path, no key column, several row groups: every row read once, keyed
    by its shard's name and row number, with the predictions of the same images read as a folder; a row
    without image bytes is an error row."""
    model = str(need(MOBILENET_INT8))
    images = sorted(sample_8.glob("*.JPEG"))
    labels = dict(line.split() for line in (sample_8 / "labels.txt").read_text().splitlines())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    shards = {"validation-00000-of-00002.parquet": images[:5], "validation-00001-of-00002.parquet": images[5:] + [None]}
    (tmp_path / "hf").mkdir()
    for name, part in shards.items():
        table = pa.table({
            "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} if p else None for p in part], image_type),
            "label": pa.array([int(labels[p.name]) if p else 0 for p in part], pa.int64()),
        })
        pq.write_table(table, tmp_path / "hf" / name, row_group_size=2)

    evaluate(model, str(sample_8), "torch", str(tmp_path / "folder"))
    metrics = evaluate(model, str(tmp_path / "hf"), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (9, 8, 1)
    by_key = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()}
    folder = {r["key"]: r for r in pq.read_table(tmp_path / "folder" / "predictions.parquet").to_pylist()}
    expected_keys = [f"{name}#{row:06d}" for name, part in shards.items() for row in range(len(part))]
    assert sorted(by_key) == expected_keys
    for name, part in shards.items():
        for row, image in enumerate(part):
            got = by_key[f"{name}#{row:06d}"]
            if image is None:
                assert got["error"] == "no image bytes"
            else:
                assert (got["label"], got["top5_ids"]) == (folder[image.name]["label"], folder[image.name]["top5_ids"])
    assert metrics["top1"] == json.loads((tmp_path / "folder" / "metrics.json").read_text())["top1"]
    # label cuts the shards at row groups (units of at most 3 rows here): the same row keys
    manifest = label(model, str(tmp_path / "hf"), str(tmp_path / "labels"), unit_size=3)
    assert (manifest["labelled"], manifest["errors"], len(manifest["shards"])) == (8, 1, 4)
    labelled = pq.read_table(tmp_path / "labels" / "labels").column("key").to_pylist()
    errors = pq.read_table(tmp_path / "labels" / "errors").column("key").to_pylist()
    assert sorted(labelled + errors) == expected_keys and errors == [expected_keys[-1]]


def test_shards_without_keys_of_one_name_in_two_folders_keep_their_rows_apart(tmp_path):
    from pipeline.sources.parquet import plan_parquet

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"image": pa.array([{"bytes": b"x", "path": None}] * 3, image_type)}),
                       tmp_path / folder / "validation-00000.parquet", row_group_size=2)
    datasource = PieceDatasource(plan_parquet(str(tmp_path / "*" / "*.parquet"), None, Cut()))
    keys = [key for task in datasource.get_read_tasks(1) for block in task() for key in block.column("key").to_pylist()]
    assert keys == [f"{folder}/validation-00000.parquet#{row:06d}" for folder in "ab" for row in range(3)]


def damage_image_pages(shard, row_group: int) -> None:
    """Overwrite the first page header of SHARD's image column in ROW_GROUP: the footer still reads."""
    column = next(c for c in (pq.read_metadata(shard).row_group(row_group).column(i) for i in range(4))
                  if c.path_in_schema.startswith("image"))
    offset = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(shard.read_bytes())
    data[offset:offset + 24] = b"\xff" * 24
    shard.write_bytes(bytes(data))


def test_a_damaged_parquet_row_group_gives_an_error_row_for_each_of_its_rows(ray_local, sample_8, tmp_path):
    """Pages that no longer read (the footer checked at the start still does) failed the whole run with
    Ray's traceback. Now each row of that row group is an error row, keyed from the key column while it
    still reads, by shard and row number otherwise; the other row groups are read as before, and
    `evaluate` and `label` account for every row once."""
    from pipeline.sources.parquet import read_row_groups

    write_parquet_shards(str(sample_8), str(tmp_path / "prepared"), shard_size=8)
    (prepared,) = (tmp_path / "prepared").glob("*.parquet")
    table = pq.read_table(prepared)
    keys = table.column("key").to_pylist()
    shard = tmp_path / "shards" / "damaged.parquet"
    shard.parent.mkdir()
    pq.write_table(table, shard, row_group_size=3)  # rows 0-2, 3-5, 6-7
    damage_image_pages(shard, 1)
    rows = pa.concat_tables(read_row_groups(str(shard), "damaged.parquet", [0, 1, 2], table.column_names)).to_pylist()
    assert [row["key"] for row in rows] == keys
    assert [bool(row["error"]) for row in rows] == [False] * 3 + [True] * 3 + [False] * 2
    assert all(row["error"].startswith("damaged Parquet row group 1 (") and row["label"] == NO_LABEL
               for row in rows[3:6])

    keyless = tmp_path / "keyless" / "validation.parquet"  # as Hugging Face writes them: no key column
    keyless.parent.mkdir()
    pq.write_table(table.drop_columns(["key"]), keyless, row_group_size=3)
    damage_image_pages(keyless, 2)
    rows = pa.concat_tables(read_row_groups(str(keyless), "validation.parquet", [2], ["image", "label"])).to_pylist()
    assert [row["key"] for row in rows] == ["validation.parquet#000006", "validation.parquet#000007"]
    assert all(row["error"].startswith("damaged Parquet row group 2") for row in rows)

    model = str(need(MOBILENET_INT8))
    metrics = evaluate(model, str(shard.parent), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (8, 5, 3)
    manifest = label(model, str(shard.parent), str(tmp_path / "labels"), unit_size=3)
    assert (manifest["images"], manifest["labelled"], manifest["errors"]) == (8, 5, 3)
    errors = pq.read_table(tmp_path / "labels" / "errors").column("key").to_pylist()
    assert sorted(errors) == sorted(keys[3:6])


def test_a_parquet_image_column_of_another_type_is_named(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "image": ["not bytes"]}), tmp_path / "text.parquet")
    with pytest.raises(SourceError, match=r"the image column must hold the encoded image \(binary\), or a struct "
                                          r"with a bytes field .* it is string"):
        read_source(str(tmp_path / "text.parquet"))
    pq.write_table(pa.table({"key": ["a"], "jpeg": [b"x"]}), tmp_path / "other.parquet")
    with pytest.raises(SourceError, match="need an image column .* its columns are key, jpeg"):
        read_source(str(tmp_path / "other.parquet"))


def test_parquet_null_keys_and_a_label_column_of_names(ray_local, sample_8, tmp_path):
    """A null key is keyed by shard and row (it reached the output as a null key); a label column of
    class names is refused by evaluate, named, and not read by label (which needs no labels: every row
    of its row group failed as 'damaged')."""
    write_parquet_shards(str(sample_8), str(tmp_path / "prepared"), shard_size=8)
    table = pq.read_table(next((tmp_path / "prepared").glob("*.parquet")))
    keys = table.column("key").to_pylist()
    (tmp_path / "nulls").mkdir()
    pq.write_table(table.set_column(0, "key", pa.array([None, None] + keys[2:], pa.string())),
                   tmp_path / "nulls" / "a.parquet")
    model = str(need(MOBILENET_INT8))
    metrics = evaluate(model, str(tmp_path / "nulls"), "torch", str(tmp_path / "out"))
    assert (metrics["images"], metrics["evaluated"]) == (8, 8)
    got = pq.read_table(tmp_path / "out" / "predictions.parquet").column("key").to_pylist()
    assert sorted(got) == sorted(["a.parquet#000000", "a.parquet#000001"] + keys[2:])

    (tmp_path / "names").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array([f"class {n}" for n in range(8)])), tmp_path / "names" / "a.parquet")
    with pytest.raises(SourceError, match="the label column must hold class indices \\(integers\\); it is string"):
        evaluate(model, str(tmp_path / "names"), "torch", str(tmp_path / "out2"))
    manifest = label(model, str(tmp_path / "names"), str(tmp_path / "labels"))
    assert (manifest["images"], manifest["labelled"], manifest["errors"]) == (8, 8, 0)
