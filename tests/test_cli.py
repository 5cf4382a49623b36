"""What the commands share: one rule for --preset, --format checked before any work, a run that
scores nothing failing, and output lines that neither wrap paths nor leave a stopped progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import MOBILENET_INT8, REPO, VAL_1300, need, subset_folder
from pipeline.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_preset_and_config_that_disagree_fail_and_that_agree_are_one_preset(tmp_path: Path):
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_text("not a model")
    disagree = invoke("evaluate", "--model", bad_model, "--data", tmp_path, "--preset", "torch",
                      "--config", REPO / "conf" / "caffe2.yaml", "--output", tmp_path / "out")
    assert disagree.exit_code == 2
    assert "--preset torch and --config" in disagree.output and "are different presets" in disagree.output
    # the same preset by name and by file: accepted, so the run goes on to find the model unusable
    agree = invoke("evaluate", "--model", bad_model, "--data", tmp_path, "--preset", "caffe2",
                   "--config", REPO / "conf" / "caffe2.yaml", "--output", tmp_path / "out")
    assert agree.exit_code == 2 and "not an ONNX model" in agree.output, agree.output


@pytest.mark.parametrize("command", [
    ["evaluate", "--data", "x"], ["label", "--data", "x", "--output", "o"],
    ["quantize", "--calibration", "x", "--out", "x.onnx"],
])
def test_an_unknown_format_is_refused_before_the_command_runs(command: list[str]):
    result = invoke(*command, "--format", "jpeg")
    assert result.exit_code == 2 and "Invalid value for '--format'" in result.output
    assert "'jpeg' is not one of 'folder', 'lmdb', 'parquet', 'tar'" in " ".join(result.output.replace("│", "").split())
    assert "no --model given" not in result.output  # refused before the default model is even looked for


def test_a_failed_run_leaves_no_progress_bar_before_the_error(tmp_path: Path):
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_text("not a model")
    result = invoke("evaluate", "--model", bad_model, "--data", tmp_path, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "evaluating" not in result.output, result.output


def test_a_run_that_scores_no_image_writes_every_row_then_fails(ray_local, tmp_path: Path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 8)
    (folder / "labels.txt").unlink()  # the images are all there, their labels are not
    output = tmp_path / ("an-output-folder-whose-path-is-longer-than-the-eighty-columns-of-a-pipe" * 2)
    result = invoke("evaluate", "--model", need(MOBILENET_INT8), "--data", folder, "--preset", "torch",
                    "--output", output)
    assert result.exit_code == 2, result.output
    assert ("error: no image could be scored: 8 error rows, 8 of them 'no label for this image'; "
            "labels come with the input or from --labels") in result.output
    metrics = json.loads((output / "metrics.json").read_text())
    assert (metrics["images"], metrics["evaluated"], metrics["errors"]) == (8, 0, 8)
    assert pq.read_table(output / "predictions.parquet").num_rows == 8
    # the table and the error rows come first, and the paths stay whole on their line
    assert "error row: ILSVRC2012_val_" in result.output
    assert f"metrics: {output / 'metrics.json'}  predictions: {output / 'predictions.parquet'}\n" in result.output
