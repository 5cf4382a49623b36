"""What the commands share: one rule for --preset, --format checked before any work, a run that
scores nothing failing, and output lines that neither wrap paths nor leave a stopped progress bar."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
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
