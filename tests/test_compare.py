"""`pipeline compare` and the quality figures: each model as `evaluate` scores it alone, the
statistics against straightforward numpy on the same predictions files, ReaL, the preset a model
carries, and the models and label files that are refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from helpers import MOBILENET_INT8, SAMPLE_1000, SHARED, VAL_1300, need, save_classifier, subset_folder
from pipeline.cli import app
from pipeline.compare import compare
from pipeline.config import load_preset
from pipeline.evaluate import evaluate
from pipeline.model_preset import model_preset
from pipeline.models import build_model
from pipeline.quantize import quantize_model, read_calibration_set

IMAGES = 160


@pytest.fixture(scope="module")
def models(ray_local, tmp_path_factory) -> dict[str, Path]:
    """EfficientNet-Lite0 fp32 as `model build` writes it, its l2 int8 model (calibrated on 16 images,
    enough for a model that differs a little) and the Model Zoo's int8 MobileNetV2 (preset torch)."""
    folder = tmp_path_factory.mktemp("models")
    fp32 = build_model("efficientnet-lite0", None, folder / "efficientnet-lite0.onnx")
    tf127 = load_preset("tf127")
    calibration = read_calibration_set(str(need(SAMPLE_1000)), tf127, images=16)
    int8 = quantize_model(fp32, calibration.batches, folder / "efficientnet-lite0-int8-l2.onnx", "l2", preset=tf127)
    return {"fp32": fp32, "int8": int8, "mobilenet": need(MOBILENET_INT8)}


@pytest.fixture(scope="module")
def compared(models, tmp_path_factory) -> Path:
    """The three models compared on the first IMAGES validation images (two distinct presets)."""
    root = tmp_path_factory.mktemp("compare")
    folder = subset_folder(need(VAL_1300), root / "images", IMAGES)
    output = root / "out"
    compare([str(models["fp32"]), str(models["int8"]), str(models["mobilenet"])], str(folder),
            [model_preset(models["fp32"]), model_preset(models["int8"]), "torch"], str(output))
    return output


def read(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path).to_pydict()
    return {column: np.array(values) for column, values in table.items()}


def test_the_preset_travels_with_the_model(models):
    assert model_preset(models["fp32"]) == model_preset(models["int8"]) == load_preset("tf127")
    assert model_preset(models["mobilenet"]) is None


def test_each_model_of_a_comparison_scores_as_evaluate_scores_it_alone(models, compared, tmp_path):
    folder = compared.parent / "images"
    comparison = json.loads((compared / "comparison.json").read_text())
    assert [m["name"] for m in comparison["models"]] == ["efficientnet-lite0", "efficientnet-lite0-int8-l2",
                                                         "mobilenetv2-12-int8"]
    for (name, model), preset in zip(models.items(), ("tf127", "tf127", "torch")):
        alone = evaluate(str(model), str(folder), preset, str(tmp_path / name))
        together = json.loads((compared / Path(model).stem / "metrics.json").read_text())
        assert together["images"] == alone["images"] == IMAGES
        assert (together["top1_correct"], together["top5_correct"]) == (alone["top1_correct"], alone["top5_correct"])
        assert together["ece"] == pytest.approx(alone["ece"]) and together["real_top1"] == alone["real_top1"]
    assert (tmp_path / "fp32" / "report.html").is_file()  # evaluate's single-model report
    assert comparison["models"][0]["top1"] > 0.7 and comparison["models"][2]["top1"] > 0.6  # real models, real labels


def wilson(successes: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_intervals_calibration_and_mcnemar_match_numpy_on_the_predictions_files(compared):
    comparison = json.loads((compared / "comparison.json").read_text())
    base = read(compared / "efficientnet-lite0" / "predictions.parquet")
    int8 = read(compared / "efficientnet-lite0-int8-l2" / "predictions.parquet")
    assert list(base["key"]) == list(int8["key"])  # written batch by batch from the same stream
    for name, rows in (("efficientnet-lite0", base), ("efficientnet-lite0-int8-l2", int8)):
        model = next(m for m in comparison["models"] if m["name"] == name)
        ids, labels = np.stack(rows["top5_ids"]), rows["label"]
        hit1, hit5 = ids[:, 0] == labels, (ids == labels[:, None]).any(axis=1)
        assert (model["top1_ci"]["low"], model["top1_ci"]["high"]) == pytest.approx(wilson(hit1.sum(), len(labels)))
        assert (model["top5_ci"]["low"], model["top5_ci"]["high"]) == pytest.approx(wilson(hit5.sum(), len(labels)))
        confidence = np.stack(rows["top5_probs"])[:, 0]
        ece = 0.0
        for low in np.arange(15) / 15:
            members = (confidence >= low) & ((confidence < low + 1 / 15) | (low == 14 / 15))
            if members.any():
                ece += members.sum() / len(labels) * abs(hit1[members].mean() - confidence[members].mean())
        assert model["ece"] == pytest.approx(ece, abs=1e-6)
    against = comparison["comparisons"][0]
    base_hit = np.stack(base["top5_ids"])[:, 0] == base["label"]
    int8_hit = np.stack(int8["top5_ids"])[:, 0] == int8["label"]
    b, c = int((base_hit & ~int8_hit).sum()), int((~base_hit & int8_hit).sum())
    assert (against["right_to_wrong"], against["wrong_to_right"]) == (b, c)
    exact = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))
    assert against["mcnemar_p"] == pytest.approx(exact)
    p, q = np.stack(base["probs"]).astype(np.float64), np.stack(int8["probs"]).astype(np.float64)
    kl = np.mean(np.sum(p * np.log(np.maximum(p, 1e-38) / np.maximum(q, 1e-38)), axis=1))
    assert against["mean_kl_from_baseline"] == pytest.approx(kl, rel=1e-4)
    assert against["top1_agreement"] == pytest.approx(np.mean(p.argmax(1) == q.argmax(1)))


def test_real_top1_is_counted_on_the_images_that_have_real_labels(compared):
    real = json.loads(need(SHARED / "data" / "imagenet" / "real.json").read_text())
    rows = read(compared / "efficientnet-lite0" / "predictions.parquet")
    sets = [set(real[int(key[len("ILSVRC2012_val_"):-len(".JPEG")]) - 1]) for key in rows["key"]]
    top1 = np.stack(rows["top5_ids"])[:, 0]
    kept = [i for i, s in enumerate(sets) if s]
    metrics = json.loads((compared / "efficientnet-lite0" / "metrics.json").read_text())
    assert metrics["real_images"] == len(kept) and metrics["real_left_out"] == IMAGES - len(kept)
    assert metrics["real_top1"] == pytest.approx(np.mean([top1[i] in sets[i] for i in kept]))


def test_the_report_names_the_flipped_images_and_shows_them(compared):
    comparison = json.loads((compared / "comparison.json").read_text())
    html = (compared / "report.html").read_text()
    for against in comparison["comparisons"]:
        flips = against["flipped_right_to_wrong"] + against["flipped_wrong_to_right"]
        assert len(flips) == min(6, against["right_to_wrong"]) + min(6, against["wrong_to_right"])
        for flip in flips:
            assert flip["key"] in html
    assert html.count('src="data:image/jpeg;base64,') >= 1 and "http" not in html.replace("http://www.w3.org", "")


def classifier_of(path: Path, size: int = 224, classes: int = 1000) -> Path:
    """A model that takes SIZE x SIZE images and scores CLASSES classes (a mean per channel, projected)."""
    weights = numpy_helper.from_array(np.ones((3, classes), np.float32), "weights")
    return save_classifier(path, [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
                                  helper.make_node("MatMul", ["mean", "weights"], ["scores"])],
                           "projection", (weights,), size=size, output_shape=("N", classes))


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_model_that_does_not_fit_the_baseline_is_named_before_any_work(tmp_path):
    baseline = classifier_of(tmp_path / "base.onnx")
    larger = classifier_of(tmp_path / "larger.onnx", size=300)
    ten = classifier_of(tmp_path / "ten.onnx", classes=10)
    absent = tmp_path / "absent"  # never read: the models are refused first
    for other, reason in ((larger, f"{larger} takes 300x300 images, the baseline {baseline} 224x224"),
                          (ten, f"{ten}: output 'scores' has shape [None, 10]")):
        result = invoke("compare", "--model", baseline, "--model", other, "--data", absent, "--preset", "torch",
                        "--output", tmp_path / "out")
        assert result.exit_code == 2 and reason in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_preset_is_refused_naming_the_presets(tmp_path):
    model = classifier_of(tmp_path / "plain.onnx")
    for command in (["evaluate"], ["label", "--output", tmp_path / "labels"], ["compare", "--model", model]):
        result = invoke(*command, "--model", model, "--data", tmp_path)
        assert result.exit_code == 2, result.output
        assert (f"error: {model} does not say how to preprocess its input (no preset in its metadata): give "
                "--preset, one of caffe2, tf127, torch or a preset YAML file") in " ".join(result.output.split())


def test_a_real_labels_file_that_does_not_cover_the_keys_is_named(ray_local, tmp_path):
    folder = subset_folder(need(VAL_1300), tmp_path / "images", 8)
    short = tmp_path / "real-short.json"
    short.write_text(json.dumps([[1]] * 10))
    metrics = evaluate(str(need(MOBILENET_INT8)), str(folder), "torch", str(tmp_path / "out"), real_labels=str(short))
    assert metrics["real_top1"] is None
    assert metrics["real_note"].startswith(f"ReaL top-1 not computed: {short} holds 10 images' labels and does not "
                                           "cover 8 of the 8 keys (such as ILSVRC2012_val_")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["real_note"] == metrics["real_note"]
    broken = tmp_path / "real-broken.json"
    broken.write_text(json.dumps({"not": "a list"}))
    result = invoke("evaluate", "--model", need(MOBILENET_INT8), "--preset", "torch", "--data", folder,
                    "--real-labels", broken, "--output", tmp_path / "out2")
    assert result.exit_code == 2 and f"--real-labels {broken}: expected a JSON list of lists of class indices" in \
        " ".join(result.output.split()), result.output
    assert not (tmp_path / "out2").exists()


CHROMIUM = Path("/usr/bin/chromium")


def open_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """PAGE loaded by headless Chromium, offline: the DOM it rendered, and every message the page wrote
    to the console (an uncaught script error is one)."""
    import subprocess

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: the report is checked in a real browser (apt-get install chromium)")
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def rendered_text(dom: str) -> str:
    import html
    import re

    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.mark.subprocess
def test_the_browser_check_sees_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>42.00%</p><script>notAFunction();</script></body></html>")
    dom, console = open_in_chromium(page, tmp_path / "profile")
    assert "42.00%" in rendered_text(dom)
    assert any("Uncaught ReferenceError: notAFunction is not defined" in line for line in console), console


@pytest.mark.subprocess
def test_the_report_loads_in_a_browser_without_errors_and_shows_the_headline_numbers(compared, tmp_path):
    comparison = json.loads((compared / "comparison.json").read_text())
    dom, console = open_in_chromium(compared / "report.html", tmp_path / "profile")
    assert console == []
    text = rendered_text(dom)
    for model in comparison["models"]:
        assert f"{model['name']} {model['evaluated']:,} 0 {100 * model['top1']:.2f}% " \
               f"[{100 * model['top1_ci']['low']:.2f}%, {100 * model['top1_ci']['high']:.2f}%] " \
               f"{100 * model['top5']:.2f}%" in text
        assert f"{100 * model['real_top1']:.2f}% {100 * model['ece']:.2f}%" in text
    for against in comparison["comparisons"]:
        assert f"{against['name']} {against['images']:,} {100 * against['top1_agreement']:.2f}% " \
               f"{against['right_to_wrong']} {against['wrong_to_right']} {against['mcnemar_p']:.3g} " \
               f"{against['mean_kl_from_baseline']:.5f}" in text
