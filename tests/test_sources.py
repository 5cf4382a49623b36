"""Labels files: real files in tmp_path, real
ImageNet JPEGs, real Ray and the real int8 MobileNetV2 where records are read."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import MOBILENET_INT8, SAMPLE_1000, need, subset_folder
from pipeline.evaluate import evaluate
from pipeline.sources import SourceError
from pipeline.sources.labels import read_labels_file


@pytest.fixture(scope="module")
def sample_8(tmp_path_factory) -> Path:
    return subset_folder(need(SAMPLE_1000), tmp_path_factory.mktemp("sample") / "images", 8)


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
