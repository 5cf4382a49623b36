"""`pipeline model import-caffe2`: Caffe2 int8 NetDefs -> int8 ONNX, checked against numpy.

Every net is written to disk through the bundled caffe2.proto (binary .pb and text .pbtxt),
imported from the files, run in onnxruntime, and compared with `caffe2_reference`, the same
int8 arithmetic done directly in Caffe2's NHWC layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import caffe2_reference as ref
from helpers import VAL_1300, need
from pipeline.caffe2.importer import Caffe2ImportError, dnnlowp_relu_qparams, import_caffe2
from pipeline.caffe2.netbuilder import int8_fill, int32_fill, make_net, make_op
from pipeline.caffe2.proto import load_net, save_net
from pipeline.cli import app
from testkit.caffe2_synthetic import INPUT_BLOB, OUTPUT_BLOB, resnet50_int8_nets

FORMATS = ["pb", "pbtxt"]
X_SCALE, X_ZP = 0.02, 120
SIZE = 9  # odd, so strided windows meet the padded border


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Float NCHW input, the ONNX model's input."""
    return np.random.default_rng(7).normal(0, 1.2, (2, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def image_q(image: np.ndarray) -> np.ndarray:
    """The same input quantised, NHWC as Caffe2 holds it."""
    return ref.quantize(image.transpose(0, 2, 3, 1), X_SCALE, X_ZP)


def uint8_weights(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def int32_bias(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-3000, 3000, n).astype(np.int32)


def quantize_op(output: str = "xq") -> object:
    return make_op("Int8Quantize", ["data"], [output], Y_scale=X_SCALE, Y_zero_point=X_ZP)


def run_imported(tmp_path: Path, fmt: str, init_ops: list, ops: list, outputs: list[str],
                 image: np.ndarray) -> list[np.ndarray]:
    """Write the nets as .{fmt} files, import them, and run the ONNX model on `image`."""
    weights = [op.output[0] for op in init_ops]
    init_path, predict_path = tmp_path / f"init.{fmt}", tmp_path / f"predict.{fmt}"
    save_net(make_net("init", init_ops), init_path)
    save_net(make_net("predict", ops, ["data", *weights], outputs), predict_path)
    model_path = tmp_path / "model.onnx"
    import_caffe2(init_path, predict_path, model_path, input_size=image.shape[-1])
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": image})


def assert_uint8_close(onnx_real: np.ndarray, scale: float, zero_point: int, expected_q: np.ndarray) -> None:
    """The ONNX output (dequantised on the way out) equals the reference within one step."""
    got = ref.quantize(onnx_real, scale, zero_point).astype(np.int32)
    diff = np.abs(got - expected_q.astype(np.int32))
    assert got.shape == expected_q.shape
    assert diff.max() <= 1, f"max difference {diff.max()} quantisation steps"
    assert (diff == 0).mean() >= 0.9, f"only {(diff == 0).mean():.1%} bit-exact"
    assert len(np.unique(got)) > 3, "degenerate test: output is (nearly) constant"


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_netdef_survives_binary_and_text_files(tmp_path: Path, fmt: str) -> None:
    weights = uint8_weights(0, (4, 3, 3, 3))  # includes bytes that are not valid UTF-8
    net = make_net("init", [int8_fill("w", weights, 0.01, 128), int32_fill("b", int32_bias(0, 4), 2e-4)])
    save_net(net, tmp_path / f"net.{fmt}")
    loaded = load_net(tmp_path / f"net.{fmt}")
    assert loaded == net
    assert np.frombuffer(loaded.op[0].arg[0].s, np.uint8).reshape(4, 3, 3, 3).tolist() == weights.tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_then_dequantize_keeps_scale_and_zero_point(tmp_path: Path, fmt: str, image: np.ndarray,
                                                             image_q: np.ndarray) -> None:
    (out,) = run_imported(tmp_path, fmt, [], [quantize_op(), make_op("Int8Dequantize", ["xq"], ["y"])], ["y"], image)
    np.testing.assert_array_equal(nchw_to_nhwc(out), ref.dequantize(image_q, X_SCALE, X_ZP))


CONV_CASES = [
    # op type, engine, order, relu, Y_zero_point
    ("Int8Conv", "", "NHWC", False, 131),
    ("Int8ConvRelu", "", "NHWC", True, 0),
    ("Int8Conv", "DNNLOWP", "NCHW", False, 128),
    ("ConvRelu", "DNNLOWP", "NHWC", True, 0),
    ("Conv", "DNNLOWP", "NHWC", False, 90),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op_type,engine,order,relu,y_zp", CONV_CASES)
def test_conv_matches_int8_arithmetic(tmp_path: Path, fmt: str, op_type: str, engine: str, order: str, relu: bool,
                                      y_zp: int, image: np.ndarray, image_q: np.ndarray) -> None:
    w_nhwc = uint8_weights(1, (8, 3, 3, 3))  # [M, kH, kW, C]
    w_stored = w_nhwc if order == "NHWC" else w_nhwc.transpose(0, 3, 1, 2)
    bias, w_scale, y_scale = int32_bias(2, 8), 0.004, 0.15
    init = [int8_fill("w", w_stored, w_scale, 125), int32_fill("b", bias, X_SCALE * w_scale)]
    ops = [
        quantize_op(),
        make_op(op_type, ["xq", "w", "b"], ["y"], engine=engine, order=order, kernel=3, stride=2,
                pads=[1, 0, 0, 1], Y_scale=y_scale, Y_zero_point=y_zp),
        make_op("Int8Dequantize", ["y"], ["y_real"]),
    ]
    (out,) = run_imported(tmp_path, fmt, init, ops, ["y_real"], image)
    expected = ref.conv_nhwc(image_q, X_SCALE, X_ZP, w_nhwc, w_scale, 125, bias, y_scale, y_zp,
                             stride=2, pads=(1, 0, 0, 1), relu=relu)
    assert_uint8_close(nchw_to_nhwc(out), y_scale, y_zp, expected)


def test_grouped_dilated_conv(tmp_path: Path, image: np.ndarray, image_q: np.ndarray) -> None:
    w1, w2 = uint8_weights(3, (8, 1, 1, 3)), uint8_weights(4, (8, 3, 3, 2))
    init = [int8_fill("w1", w1, 0.01, 128), int32_fill("b1", int32_bias(5, 8), X_SCALE * 0.01),
            int8_fill("w2", w2, 0.003, 128), int32_fill("b2", int32_bias(6, 8), 0.1 * 0.003)]
    ops = [
        quantize_op(),
        make_op("Int8Conv", ["xq", "w1", "b1"], ["a"], order="NHWC", kernel=1, Y_scale=0.1, Y_zero_point=128),
        make_op("Int8Conv", ["a", "w2", "b2"], ["y"], order="NHWC", kernel=3, group=4, dilation=2, pad=2,
                Y_scale=0.05, Y_zero_point=128),
    ]
    (out,) = run_imported(tmp_path, "pb", init, ops, ["y"], image)
    a = ref.conv_nhwc(image_q, X_SCALE, X_ZP, w1, 0.01, 128, int32_bias(5, 8), 0.1, 128)
    expected = ref.conv_nhwc(a, 0.1, 128, w2, 0.003, 128, int32_bias(6, 8), 0.05, 128, pads=(2, 2, 2, 2),
                             group=4, dilation=2)
    assert_uint8_close(nchw_to_nhwc(out), 0.05, 128, expected)


def test_dnnlowp_relu_fusion_uses_the_requantisation_caffe2_applies(tmp_path: Path, image: np.ndarray,
                                                                    image_q: np.ndarray) -> None:
    """DNNLOWP re-chooses a ReLU-fused output's qparams over [0, max]; QNNPACK keeps them."""
    w = uint8_weights(1, (8, 3, 3, 3))
    init = [int8_fill("w", w, 0.004, 128), int32_fill("b", int32_bias(2, 8), X_SCALE * 0.004)]
    stored_scale, stored_zp = 0.1, 40
    ops = [quantize_op(), make_op("Int8ConvRelu", ["xq", "w", "b"], ["y"], engine="DNNLOWP", order="NHWC", kernel=3,
                                  Y_scale=stored_scale, Y_zero_point=stored_zp)]
    (out,) = run_imported(tmp_path, "pbtxt", init, ops, ["y"], image)
    scale, zp = dnnlowp_relu_qparams(stored_scale, stored_zp)
    assert zp == 0 and scale == pytest.approx(stored_scale * 215 / 255, rel=1e-6)
    expected = ref.conv_nhwc(image_q, X_SCALE, X_ZP, w, 0.004, 128, int32_bias(2, 8), scale, 0, relu=True)
    assert_uint8_close(nchw_to_nhwc(out), scale, 0, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op_type,engine,relu", [("Int8Sum", "", False), ("Int8SumRelu", "", True),
                                                 ("SumRelu", "DNNLOWP", True), ("Int8Add", "", False)])
def test_sum_of_differently_quantised_inputs(tmp_path: Path, fmt: str, op_type: str, engine: str, relu: bool,
                                             image: np.ndarray) -> None:
    y_scale, y_zp = 0.03, 0 if engine else 100
    ops = [
        make_op("Int8Quantize", ["data"], ["a"], Y_scale=0.02, Y_zero_point=120),
        make_op("Int8Quantize", ["data"], ["b"], Y_scale=0.035, Y_zero_point=60),
        make_op(op_type, ["a", "b"], ["y"], engine=engine, Y_scale=y_scale, Y_zero_point=y_zp),
    ]
    (out,) = run_imported(tmp_path, fmt, [], ops, ["y"], image)
    x = nchw_to_nhwc(image)
    expected = ref.add(ref.quantize(x, 0.02, 120), 0.02, 120, ref.quantize(x, 0.035, 60), 0.035, 60,
                       y_scale, y_zp, relu=relu)
    assert_uint8_close(nchw_to_nhwc(out), y_scale, y_zp, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("engine", ["", "DNNLOWP"])
def test_max_pool(tmp_path: Path, fmt: str, engine: str, image: np.ndarray, image_q: np.ndarray) -> None:
    op_type = "Int8MaxPool" if not engine else "MaxPool"
    ops = [quantize_op(), make_op(op_type, ["xq"], ["y"], engine=engine, order="NHWC", kernel=3, stride=2, pad=1,
                                  Y_scale=X_SCALE, Y_zero_point=X_ZP)]
    (out,) = run_imported(tmp_path, fmt, [], ops, ["y"], image)
    np.testing.assert_array_equal(
        ref.quantize(nchw_to_nhwc(out), X_SCALE, X_ZP), ref.max_pool_nhwc(image_q, 3, 2, (1, 1, 1, 1))
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("window", [
    {"kernel": 3, "stride": 2, "pad": 1},
    {"kernel": 9, "stride": 1},
    {"global_pooling": 1},
])
def test_average_pool(tmp_path: Path, fmt: str, window: dict, image: np.ndarray, image_q: np.ndarray) -> None:
    y_scale, y_zp = 0.01, 110
    ops = [quantize_op(), make_op("Int8AveragePool", ["xq"], ["y"], order="NHWC", Y_scale=y_scale, Y_zero_point=y_zp,
                                  **window)]
    (out,) = run_imported(tmp_path, fmt, [], ops, ["y"], image)
    kernel, stride, pad = window.get("kernel", SIZE), window.get("stride", 1), window.get("pad", 0)
    expected = ref.average_pool_nhwc(image_q, X_SCALE, X_ZP, kernel, stride, (pad,) * 4, y_scale, y_zp)
    got = ref.quantize(nchw_to_nhwc(out), y_scale, y_zp).astype(np.int32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flatten_first", [False, True])
def test_fc_flattens_nhwc_blobs_in_caffe2_order_then_softmax(tmp_path: Path, fmt: str, flatten_first: bool,
                                                              image: np.ndarray, image_q: np.ndarray) -> None:
    conv_w, fc_w = uint8_weights(8, (4, 3, 3, 3)), uint8_weights(9, (10, 5 * 5 * 4))
    init = [int8_fill("cw", conv_w, 0.005, 128), int32_fill("cb", int32_bias(10, 4), X_SCALE * 0.005),
            int8_fill("fw", fc_w, 0.002, 130), int32_fill("fb", int32_bias(11, 10), 0.05 * 0.002)]
    ops = [
        quantize_op(),
        make_op("Int8ConvRelu", ["xq", "cw", "cb"], ["c"], order="NHWC", kernel=3, stride=2, pad=1,
                Y_scale=0.05, Y_zero_point=0),
    ]
    fc_in = "c"
    if flatten_first:
        ops.append(make_op("Int8Flatten", ["c"], ["c_flat"], axis=1, Y_scale=0.05, Y_zero_point=0))
        fc_in = "c_flat"
    ops += [
        make_op("Int8FC", [fc_in, "fw", "fb"], ["logits"], Y_scale=0.2, Y_zero_point=128),
        make_op("Int8Dequantize", ["logits"], ["logits_real"]),
        make_op("Softmax", ["logits_real"], ["prob"]),
    ]
    logits, prob = run_imported(tmp_path, fmt, init, ops, ["logits_real", "prob"], image)
    conv = ref.conv_nhwc(image_q, X_SCALE, X_ZP, conv_w, 0.005, 128, int32_bias(10, 4), 0.05, 0, stride=2,
                         pads=(1, 1, 1, 1), relu=True)
    expected = ref.fc(conv, 0.05, 0, fc_w, 0.002, 130, int32_bias(11, 10), 0.2, 128)  # NHWC flatten order
    assert_uint8_close(logits, 0.2, 128, expected)
    np.testing.assert_allclose(prob, ref.softmax(logits), rtol=1e-5, atol=1e-7)
    assert prob.shape == (2, 10)


def _net_with_unsupported_op(tmp_path: Path) -> tuple[Path, Path]:
    ops = [quantize_op("xq"), make_op("Int8Relu", ["xq"], ["r"], Y_scale=X_SCALE, Y_zero_point=X_ZP),
           make_op("Int8LeakyRelu", ["r"], ["y"], name="leaky", alpha=0.1, Y_scale=X_SCALE, Y_zero_point=X_ZP)]
    save_net(make_net("init", []), tmp_path / "init.pbtxt")
    save_net(make_net("predict", ops, ["data"], ["y"]), tmp_path / "predict.pbtxt")
    return tmp_path / "init.pbtxt", tmp_path / "predict.pbtxt"


def test_unknown_operator_stops_the_import_naming_it(tmp_path: Path) -> None:
    init, predict = _net_with_unsupported_op(tmp_path)
    with pytest.raises(Caffe2ImportError, match=r"operator #2 Int8LeakyRelu 'leaky'.*not supported"):
        import_caffe2(init, predict, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_cli_reports_unknown_operator_without_traceback(tmp_path: Path) -> None:
    init, predict = _net_with_unsupported_op(tmp_path)
    result = CliRunner().invoke(app, ["model", "import-caffe2", "--init", str(init), "--predict", str(predict),
                                      "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 2
    assert "operator #2 Int8LeakyRelu 'leaky'" in result.output
    assert "Traceback" not in result.output


def test_float_operator_without_dnnlowp_engine_is_not_taken_for_int8(tmp_path: Path, image: np.ndarray) -> None:
    """A plain float Conv is a different operator from Conv with engine DNNLOWP."""
    init = [int8_fill("w", uint8_weights(1, (8, 3, 3, 3)), 0.004, 128)]
    ops = [quantize_op(), make_op("Conv", ["xq", "w"], ["y"], order="NHWC", kernel=3, Y_scale=0.1, Y_zero_point=0)]
    with pytest.raises(Caffe2ImportError, match=r"operator #1 Conv: operator not supported"):
        run_imported(tmp_path, "pb", init, ops, ["y"], image)


def test_cli_rejects_a_file_that_is_not_a_netdef(tmp_path: Path) -> None:
    bogus = tmp_path / "init.pb"
    bogus.write_bytes(b"\xff\xff\xff not protobuf")
    result = CliRunner().invoke(app, ["model", "import-caffe2", "--init", str(bogus), "--predict", str(bogus),
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "not a Caffe2 NetDef" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("resnet50_caffe2")
    init_net, predict_net = resnet50_int8_nets(seed=0, engine="DNNLOWP")
    save_net(init_net, folder / "resnet50_quantized_init_net.pb")
    save_net(predict_net, folder / "resnet50_quantized_predict_net.pb")
    return folder / "resnet50_quantized_init_net.pb", folder / "resnet50_quantized_predict_net.pb"


@pytest.fixture(scope="module")
def resnet50_onnx(resnet50_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    init, predict = resnet50_files
    out = tmp_path_factory.mktemp("resnet50_onnx") / "resnet50_int8.onnx"
    result = CliRunner().invoke(app, ["model", "import-caffe2", "--init", str(init), "--predict", str(predict),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_resnet50_shaped_int8_net_imports_and_runs(resnet50_onnx: Path) -> None:
    model = onnx.load(str(resnet50_onnx))
    op_types = [node.op_type for node in model.graph.node]
    assert op_types.count("QLinearConv") == 53 + 1  # 53 convolutions and the FC
    assert op_types.count("Gather") == 16  # the 16 residual sums, looked up in tables of DNNLOWP's arithmetic
    assert "Conv" not in op_types and "MatMul" not in op_types  # int8 throughout
    session = ort.InferenceSession(str(resnet50_onnx), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == (INPUT_BLOB, ["N", 3, 224, 224])
    assert (out.name, out.shape) == (OUTPUT_BLOB, ["N", 1000])
    images = np.random.default_rng(3).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    (prob,) = session.run(None, {INPUT_BLOB: images})
    assert prob.shape == (2, 1000)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(prob[0] - prob[1]).max() > 0, "different images give identical outputs: activations collapsed"


def test_imported_resnet50_runs_through_evaluate_with_caffe2_preset(ray_local, resnet50_onnx: Path,
                                                                    tmp_path: Path) -> None:
    from pipeline.evaluate import evaluate

    metrics = evaluate(str(resnet50_onnx), str(need(VAL_1300)), "caffe2", str(tmp_path), limit=16)
    assert (metrics["preset"], metrics["images"], metrics["evaluated"], metrics["errors"]) == ("caffe2", 16, 16, 0)
    rows = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    assert len({row["key"] for row in rows}) == 16
    for row in rows:
        assert all(0 <= class_id < 1000 for class_id in row["top5_ids"])
        assert row["top5_probs"] == sorted(row["top5_probs"], reverse=True)
        assert 0 < sum(row["top5_probs"]) <= 1.0001
