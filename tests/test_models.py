"""ONNX graphs built from state dicts: ResNet-50 (generated weights) and EfficientNet-Lite0 (the
real ImageNet checkpoint), run by onnxruntime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from helpers import VAL_1300, need
from pipeline.cli import app
from pipeline.config import load_preset
from pipeline.models import build_model
from pipeline.models.efficientnet_lite0 import default_weights_path, same_pads
from pipeline.weights import WeightsError
from testkit.reference import reference_predictions


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory) -> Path:
    return build_model("resnet50", "generated", tmp_path_factory.mktemp("models") / "resnet50.onnx")


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory) -> Path:
    return build_model("efficientnet-lite0", None, tmp_path_factory.mktemp("models") / "efficientnet-lite0.onnx")


def initializer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def test_resnet50_generated_has_torchvision_structure(resnet50: Path):
    model = onnx.load(resnet50)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 53 and ops["Add"] == 16 and ops["Gemm"] == 1 and ops["Softmax"] == 1
    assert "BatchNormalization" not in ops  # folded into the convolutions
    shapes = initializer_shapes(model)
    assert shapes["fc.weight"] == (1000, 2048)
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    conv2 = next(n for n in model.graph.node if n.name == "layer2.0.conv2")
    assert list(next(a for a in conv2.attribute if a.name == "strides").ints) == [2, 2]

    session = ort.InferenceSession(str(resnet50), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "input" and graph_input.shape[1:] == [3, 224, 224]
    for batch in (1, 3):  # dynamic batch
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        (probs,) = session.run(None, {"input": x})
        assert probs.shape == (batch, 1000)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
        assert np.isfinite(probs).all()


def test_generated_weights_are_seeded(resnet50: Path, tmp_path: Path):
    again = build_model("resnet50", "generated", tmp_path / "again.onnx")
    assert again.read_bytes() == resnet50.read_bytes()


def test_wrong_checkpoint_for_architecture_fails_clearly(tmp_path: Path):
    with pytest.raises(WeightsError, match=r"missing tensor conv1\.weight"):
        build_model("resnet50", default_weights_path(), tmp_path / "x.onnx")
    with pytest.raises(WeightsError, match="unknown architecture"):
        build_model("vgg16", "generated", tmp_path / "x.onnx")


def test_tensorflow_same_padding():
    assert same_pads(224, 3, 2) == (0, 0, 1, 1)  # TF puts the extra row/column at the end
    assert same_pads(28, 5, 2) == (1, 1, 2, 2)
    assert same_pads(14, 5, 1) == (2, 2, 2, 2)


def test_efficientnet_lite0_structure(efficientnet: Path):
    model = onnx.load(efficientnet)
    ops = Counter(node.op_type for node in model.graph.node)
    # stem + 16 depthwise + 16 project + 15 expand + head; no squeeze-excitation in Lite
    assert ops["Conv"] == 49 and ops["Add"] == 9 and "Sigmoid" not in ops and "Mul" not in ops
    assert initializer_shapes(model)["_fc.weight"] == (1000, 1280)


def test_efficientnet_lite0_accuracy_with_real_checkpoint(efficientnet: Path):
    """The first 200 images of imagenet-val-1300 (preset tf127, scale 256): 160 right by a direct
    onnxruntime + Pillow run of these weights (81.5% top-1 / 94.8% top-5 at scale 224 and
    82.4% / 95.2% at scale 256 on all 1,300)."""
    rows = list(reference_predictions(str(efficientnet), need(VAL_1300), load_preset("tf127"), limit=200))
    top1 = sum(int(ids[0]) == label for _, label, ids in rows) / len(rows)
    top5 = sum(label in ids for _, label, ids in rows) / len(rows)
    assert len(rows) == 200
    assert top1 >= 0.785 and top5 >= 0.92, (top1, top5)


def test_cli_model_build(tmp_path: Path):
    result = CliRunner().invoke(app, ["model", "build", "resnet50", "--weights", "generated",
                                      "--out", str(tmp_path / "r.onnx")])
    assert result.exit_code == 0, result.output
    assert onnx.load(tmp_path / "r.onnx").graph.output[0].name == "probabilities"
    result = CliRunner().invoke(app, ["model", "build", "resnet50", "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "--weights" in result.output and "Traceback" not in result.output
