"""What the commands share: one rule for --preset, --format checked before any work, a run that
scores nothing failing, and output lines that neither wrap paths nor leave a stopped progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from helpers import MOBILENET_INT8, REPO, VAL_1300, need, run_cli, save_classifier, subset_folder
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


def model_failing_at_run_time(path: Path) -> Path:
    """A valid classifier graph (N x 3 x 224 x 224 in, N x 1000 out) whose Reshape to (5, -1) fails in
    onnxruntime for any batch of images not a multiple of 5: it loads, then fails inside the actors."""
    return save_classifier(
        path,
        [helper.make_node("Reshape", ["input", "shape"], ["rows"]),
         helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("Tile", ["mean", "repeats"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "fails_at_run_time",
        (numpy_helper.from_array(np.array([5, -1], np.int64), "shape"),
         numpy_helper.from_array(np.array([1, 1000], np.int64), "repeats")))


@pytest.mark.subprocess
def test_a_run_that_fails_inside_ray_ends_with_the_remote_error_on_one_line(tmp_path: Path):
    """The innermost remote error, not Ray's traceback, nor (as `evaluate` said before) Ray Data's advice
    on retries; `label`, which let the whole traceback through, now also says how to go on."""
    model = model_failing_at_run_time(tmp_path / "fails.onnx")
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 8)
    for command, output in (("evaluate", tmp_path / "a"), ("label", tmp_path / "b")):
        result = run_cli(command, "--model", model, "--data", folder, "--preset", "torch", "--output", output)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert error.startswith("error: the Ray pipeline failed: onnxruntime.capi.onnxruntime_pybind11_state.Fail: "
                                "[ONNXRuntimeError]")
        assert "The input tensor cannot be reshaped to the requested shape" in error and "retry" not in error
    assert error.endswith("keeps the units finished so far: --resume finishes the run with the same options, "
                          "--overwrite starts again")


def test_a_failed_ray_data_task_is_reported_as_its_exception_with_its_whole_message(ray_local):
    """Without Ray Data's wrapping and its advice on retries, for a failed map and a failed read."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from ray.exceptions import RayError

    from pipeline.console import ray_failure_reason

    def damaged(batch):
        raise OSError("Couldn't deserialize thrift: don't know what type:\nDeserializing page header failed.")

    with pytest.raises(RayError) as failure:
        ray.data.range(4).map_batches(damaged).take_all()
    assert ray_failure_reason(failure.value) == ("OSError: Couldn't deserialize thrift: don't know what type: "
                                                 "Deserializing page header failed.")

    class FailingSource(Datasource):  # a read task's error reaches the driver in another form
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                raise OverflowError("Python int too large to convert to C long")

            return [ReadTask(read, BlockMetadata(num_rows=1, size_bytes=None, exec_stats=None, input_files=None))]

    with pytest.raises(RayError) as failure:
        ray.data.read_datasource(FailingSource(), override_num_blocks=1).take_all()
    assert ray_failure_reason(failure.value) == "OverflowError: Python int too large to convert to C long"


def test_an_output_that_cannot_be_a_folder_is_named_before_any_work(tmp_path: Path):
    """A file given as --output, or a path below a file, is one line (exit code 2), not a traceback
    after Ray has started."""
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 2)
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    runs = {
        "evaluate": ["evaluate", "--model", need(MOBILENET_INT8), "--preset", "torch", "--data", folder, "--output"],
        "label": ["label", "--model", MOBILENET_INT8, "--preset", "torch", "--data", folder, "--output"],
        "prepare": ["prepare", "--images", folder, "--out"],
    }
    for command, args in runs.items():
        result = invoke(*args, a_file)
        assert result.exit_code == 2 and f"error: {a_file} is a file, not a folder" in result.output, \
            (command, result.output)
        below = invoke(*args, a_file / "out")
        assert below.exit_code == 2 and "cannot make the output folder there (Not a directory)" in below.output, \
            (command, below.output)
    assert a_file.read_text() == "not a folder"
    inside = invoke("label", "--model", MOBILENET_INT8, "--preset", "torch", "--data", folder,
                    "--output", folder / "labels-out")
    assert inside.exit_code == 2 and "is inside the input" in inside.output and not (folder / "labels-out").exists()


def test_a_model_onnxruntime_cannot_load_is_named_before_ray_starts(tmp_path: Path):
    """A graph that parses and has the right input and output but an operator onnxruntime does not know:
    before, every inference actor failed to start and Ray printed each one's traceback."""
    model = save_classifier(tmp_path / "unknown-op.onnx", [helper.make_node("NoSuchOp", ["input"], ["probs"])],
                            "unknown_op", opset=17)
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 2)
    for args in (["evaluate", "--output", tmp_path / "a"], ["label", "--output", tmp_path / "b"],
                 ["quantize", "--calibration", folder, "--out", tmp_path / "int8.onnx"]):
        result = invoke(*args, "--model", model, "--preset", "torch",
                        *(["--data", folder] if args[0] != "quantize" else []))
        assert result.exit_code == 2, result.output
        assert f"error: {model}: onnxruntime cannot load it: " in result.output and "NoSuchOp" in result.output


def test_a_model_whose_input_is_not_float_is_named_before_ray_starts(tmp_path: Path):
    """It failed on every batch inside Ray, leaving only predictions.parquet.partial."""
    model = save_classifier(
        tmp_path / "uint8.onnx",
        [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["probs"], axes=[2, 3], keepdims=0)], "uint8_input",
        input_type=TensorProto.UINT8)
    result = invoke("evaluate", "--model", model, "--data", tmp_path, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "input 'input' takes UINT8, expected FLOAT" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_a_folder_as_out_before_any_work(tmp_path: Path):
    result = invoke("quantize", "--model", tmp_path / "absent.onnx", "--calibration", tmp_path, "--out", tmp_path)
    assert result.exit_code == 2 and f"error: {tmp_path} is a folder: --out names the .onnx file to write" in \
        " ".join(result.output.split())


@pytest.mark.subprocess
def test_a_cluster_that_cannot_be_joined_is_one_line(tmp_path: Path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 2)
    for address, reason in (("not an address", "Invalid address format"),
                            ("ray://127.0.0.1:1", "Ray Client requires pip package `ray[client]`"),
                            ("127.0.0.1:1", "nothing answers there (Connection refused)")):  # Ray waited for ever
        result = run_cli("evaluate", "--model", need(MOBILENET_INT8), "--preset", "torch", "--data", folder,
                         "--output", tmp_path / "out", "--address", address)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"error: cannot join the Ray cluster at {address!r}: {reason}" in result.stderr


@pytest.mark.parametrize("format", ["parquet", "lmdb-datum", "lmdb-caffe2"])
def test_prepare_refuses_an_empty_folder_as_evaluate_does_and_writes_nothing(tmp_path: Path, format: str):
    """It wrote 0 records (an empty output folder, or an empty LMDB database) with exit code 0."""
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    (folder / "labels.txt").write_text("")  # a labels file naming no image adds no record
    result = invoke("prepare", "--images", folder, "--out", out, "--format", format)
    assert result.exit_code == 2 and f"error: {folder}: no files to read" in result.output, result.output
    assert not out.exists()


def test_an_output_file_that_cannot_be_written_is_named_before_any_work(tmp_path: Path):
    """quantize and model build/import-caffe2 wrote their model only once it was calibrated, built or
    converted (minutes), then failed with a bare OSError; here the inputs are absent too, so any work
    done before the check would fail on them first."""
    absent = tmp_path / "absent"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    commands = {
        "quantize": ["quantize", "--model", absent / "fp32.onnx", "--calibration", absent, "--out"],
        "model build": ["model", "build", "resnet50", "--weights", absent / "weights.pth", "--out"],
        "model import-caffe2": ["model", "import-caffe2", "--init", absent / "init.pb",
                                "--predict", absent / "predict.pb", "--out"],
    }
    for command, args in commands.items():
        result = invoke(*args, "/sys/x.onnx")  # sysfs: nobody, not even root, creates a file there
        assert result.exit_code == 2, (command, result.output)
        assert "/sys/x.onnx: cannot write the output file there (Permission denied)" in result.output, \
            (command, result.output)
        below = invoke(*args, a_file / "x.onnx")
        assert below.exit_code == 2 and f"{a_file} is a file, not a folder" in below.output, \
            (command, below.output)
    assert a_file.read_text() == "not a folder" and list(tmp_path.iterdir()) == [a_file]
    report = invoke("quantize", "--model", absent / "fp32.onnx", "--calibration", absent, "--eval", absent,
                    "--out", tmp_path / "int8.onnx", "--report", "/sys/report.json")
    assert report.exit_code == 2 and "/sys/report.json: cannot write the output file there" in report.output, \
        report.output
    folder = invoke("quantize", "--model", absent / "fp32.onnx", "--calibration", absent, "--eval", absent,
                    "--out", tmp_path / "int8.onnx", "--report", tmp_path)
    assert folder.exit_code == 2 and f"{tmp_path} is a folder: --report names the JSON file to write" in \
        " ".join(folder.output.split()), folder.output


def model_with_nan_outputs(path: Path) -> Path:
    """A classifier (N x 3 x 224 x 224 in, N x 1000 logits out) whose logits are log(mean pixel + class
    id / 1000): finite, class 999 first, for a bright image; NaN (log of a negative number) for a dark
    one, whose normalised pixels are all below -1."""
    return save_classifier(
        path,
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["mean", "axis"], ["column"]),
         helper.make_node("Add", ["column", "offsets"], ["shifted"]),
         helper.make_node("Log", ["shifted"], ["logits"])],
        "nan_for_dark_images",
        (numpy_helper.from_array(np.array([1], np.int64), "axis"),
         numpy_helper.from_array((np.arange(1000, dtype=np.float32) / 1000)[None, :], "offsets")))


def test_an_image_the_model_scores_nan_is_an_error_row_not_a_prediction(ray_local, tmp_path: Path):
    """Its top-5 classes were the ranks of NaN scores, reported and counted as a wrong prediction."""
    from PIL import Image

    from pipeline.inference import NON_FINITE_OUTPUT

    model = model_with_nan_outputs(tmp_path / "nan.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, grey in (("bright-a.png", 250), ("dark.png", 5), ("bright-b.png", 240)):
        Image.new("RGB", (256, 256), (grey, grey, grey)).save(folder / name)
    (folder / "labels.txt").write_text("bright-a.png 999\ndark.png 999\nbright-b.png 999\n")

    evaluated = invoke("evaluate", "--model", model, "--data", folder, "--preset", "torch",
                       "--output", tmp_path / "evaluation")
    assert evaluated.exit_code == 0, evaluated.output
    assert f"error row: dark.png: {NON_FINITE_OUTPUT}" in evaluated.output
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert (metrics["images"], metrics["evaluated"], metrics["errors"], metrics["top1"]) == (3, 2, 1, 1.0)
    rows = sorted(pq.read_table(tmp_path / "evaluation" / "predictions.parquet").to_pylist(), key=lambda r: r["key"])
    assert [(row["key"], row["error"], row["top5_ids"][0]) for row in rows] == [
        ("bright-a.png", "", 999), ("bright-b.png", "", 999), ("dark.png", NON_FINITE_OUTPUT, -1)]

    labelled = invoke("label", "--model", model, "--data", folder, "--preset", "torch",
                      "--output", tmp_path / "labels")
    assert labelled.exit_code == 0 and "3 images: 2 labelled, 1 errors" in labelled.output, labelled.output
    errors = pq.read_table(tmp_path / "labels" / "errors").to_pylist()
    assert errors == [{"key": "dark.png", "reason": NON_FINITE_OUTPUT}]


@pytest.mark.subprocess
def test_a_ctrl_c_as_a_run_finishes_prints_no_traceback(tmp_path: Path):
    """Ctrl-C once the results are written, while Ray shuts down at exit: Python printed "Exception
    ignored in atexit callback" and Ray's traceback (in most runs, at any of these delays)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = subset_folder(need(VAL_1300), tmp_path / "images", 4)
    for delay in (0.05, 0.2, 0.5):
        # a session of its own: Ctrl-C goes to the terminal's whole foreground process group
        run = subprocess.Popen([sys.executable, "-m", "pipeline", "evaluate", "--model", need(MOBILENET_INT8),
                                "--preset", "torch", "--data", folder, "--output", tmp_path / "out"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        before = ""
        for line in run.stderr:
            before += line
            if line.startswith("report: "):  # the run's last line
                time.sleep(delay)
                os.killpg(run.pid, signal.SIGINT)
                break
        after = run.communicate(timeout=300)[1]
        assert "metrics: " in before, before
        assert "Traceback" not in after and "Exception ignored" not in after, (delay, after)
        # done; interrupted as the command returned (Typer's quiet 130); or killed once Ray was down
        assert run.returncode in (0, 130, -signal.SIGINT), (delay, run.returncode)
