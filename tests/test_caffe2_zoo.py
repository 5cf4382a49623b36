"""The Caffe2 model zoo's published int8 predict nets (../shared/models/caffe2), imported with init
nets synthesised to fit them, against `caffe2_reference.run_net`: numpy written from each engine's
own arithmetic (DNNLOWP/fbgemm for the ResNet-50, Caffe2's QNNPACK operators for the MobileNetV2).

The import is claimed bit-exact for both engines, so every uint8 output of every operator must be
equal: op by op (the reference continuing from the model's own values, so one difference cannot
hide behind another) and end to end from the same image.
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
from helpers import SHARED, VAL_1300, need, subset_folder
from pipeline.caffe2.importer import Caffe2ImportError, convert_nets, import_caffe2, int8_trace_name, read_constants
from pipeline.caffe2.netbuilder import int8_fill, int32_fill, make_net, make_op
from pipeline.caffe2.proto import load_net, save_net
from pipeline.cli import app
from pipeline.config import load_preset
from pipeline.model_preset import model_preset
from pipeline.preprocess import decode_image, preprocess_image
from pipeline.vnni import u8s8_saturation_warning
from testkit.caffe2_synthetic import zoo_init_net

ZOO = SHARED / "models" / "caffe2"
NETS = {
    # architecture: (predict net, input blob, output blob, [N, 3, 224, 224] ONNX op types that must appear)
    "resnet50": ("resnet50_quantized_predict_net.pb", "gpu_0/data_0", "gpu_0/softmax_1", {"QLinearConv"}),
    "mobilenet_v2": ("mobilenet_v2_quantized_predict_net.pb", "data", "softmax", {"ConvInteger", "Gather"}),
}
IMAGES = 4


@pytest.fixture(scope="module", params=sorted(NETS))
def zoo_net(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One zoo predict net with its synthesised init net, imported through the CLI."""
    arch = request.param
    predict_file, input_blob, output_blob, op_types = NETS[arch]
    predict_net = load_net(need(ZOO / predict_file))
    init_net = zoo_init_net(predict_net, arch, seed=1)
    folder = tmp_path_factory.mktemp(arch)
    save_net(init_net, folder / "init_net.pb")
    out = folder / f"{arch}_int8.onnx"
    result = CliRunner().invoke(app, ["model", "import-caffe2", "--init", str(folder / "init_net.pb"),
                                      "--predict", str(ZOO / predict_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"arch": arch, "init": init_net, "predict": predict_net, "onnx": out, "input": input_blob,
            "output": output_blob, "op_types": op_types}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """A few real validation images, preprocessed as the zoo's readmes say (preset caffe2)."""
    preset = load_preset("caffe2")
    names = [line.split()[0] for line in (need(VAL_1300) / "labels.txt").read_text().split("\n")[:IMAGES]]
    return np.stack([preprocess_image(decode_image((VAL_1300 / name).read_bytes()), preset) for name in names])


def nhwc(values: np.ndarray) -> np.ndarray:
    return values.transpose(0, 2, 3, 1) if values.ndim == 4 else values


def test_zoo_net_matches_its_engine_bit_for_bit(zoo_net: dict, images: np.ndarray) -> None:
    model = onnx.load(str(zoo_net["onnx"]))
    assert zoo_net["op_types"] <= {node.op_type for node in model.graph.node}
    assert model_preset(zoo_net["onnx"]).name == "caffe2"
    traced = convert_nets(zoo_net["init"], zoo_net["predict"], trace_int8=True)
    session = ort.InferenceSession(traced.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    produced = dict(zip(names, session.run(None, {zoo_net["input"]: images})))
    constants = read_constants(zoo_net["init"])
    predict_net = zoo_net["predict"]
    int8_ops = [(i, op.output[0]) for i, op in enumerate(predict_net.op)
                if op.type.startswith("Int8") and op.type != "Int8Dequantize"]
    forced = {i: nhwc(produced[int8_trace_name(i, blob)]) for i, blob in int8_ops}

    per_op, _ = ref.run_net(constants, predict_net, images, forced=forced)
    assert [(i, blob) for i, blob, _ in per_op] == int8_ops
    for index, blob, expected in per_op:
        got = forced[index]
        assert got.shape == expected.shape, (index, blob)
        mismatches = int((got != expected).sum())
        assert mismatches == 0, f"operator #{index} {predict_net.op[index].type} -> {blob}: {mismatches} outputs differ"
        assert len(np.unique(expected)) > 3, f"operator #{index}: degenerate synthetic weights"

    end_to_end, blobs = ref.run_net(constants, predict_net, images)
    for index, blob, expected in end_to_end:
        np.testing.assert_array_equal(forced[index], expected, err_msg=f"operator #{index} -> {blob}")
    np.testing.assert_allclose(produced[zoo_net["output"]], blobs[zoo_net["output"]][0], rtol=1e-5, atol=1e-6)

    # Top-1 of the model equals the reference's wherever the first two int8 logits are 2+ steps apart.
    fc_index = max(i for i, op in enumerate(predict_net.op) if op.type == "Int8FC")
    logits = next(values for i, _, values in end_to_end if i == fc_index).astype(np.int32)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 2
    assert clear.any(), "no test image has a clear top-1: the check would be vacuous"
    probabilities = produced[zoo_net["output"]]
    np.testing.assert_array_equal(probabilities[clear].argmax(axis=1), logits[clear].argmax(axis=1))


def test_imported_zoo_net_runs_through_evaluate(ray_local, zoo_net: dict, tmp_path: Path) -> None:
    from pipeline.evaluate import evaluate

    data = subset_folder(need(VAL_1300), tmp_path / "images", 4)
    metrics = evaluate(str(zoo_net["onnx"]), str(data), "caffe2", str(tmp_path / "out"), batch_size=2)
    assert (metrics["preset"], metrics["images"], metrics["evaluated"], metrics["errors"]) == ("caffe2", 4, 4, 0)
    rows = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    assert len(rows) == 4 and all(0 < sum(row["top5_probs"]) <= 1.0001 for row in rows)


def test_vnni_warning_names_full_range_s8_weights_on_avx2_without_vnni(zoo_net: dict, tmp_path: Path) -> None:
    without_vnni, with_vnni = tmp_path / "avx2", tmp_path / "vnni"
    without_vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    with_vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512_vnni\n")
    warning = u8s8_saturation_warning(zoo_net["onnx"], without_vnni)
    if zoo_net["arch"] == "resnet50":
        # DNNLOWP weights become int8 for onnxruntime's u8s8 QLinearConv, full range as published.
        assert warning is not None and "without VNNI" in warning and warning.count("\n") == 0
    else:
        assert warning is None  # QNNPACK weights stay uint8 (ConvInteger u8u8): nothing to saturate
    assert u8s8_saturation_warning(zoo_net["onnx"], with_vnni) is None


def _tiny_nets(extra_inputs: list[str]) -> tuple:
    init = [int8_fill("w", np.full((4, 1, 1, 3), 140, np.uint8), 0.01, 128),
            int32_fill("b", np.zeros(4, np.int32), 1e-4)]
    ops = [make_op("NCHW2NHWC", ["data"], ["x"]),
           make_op("Int8Quantize", ["x"], ["xq"], Y_scale=0.02, Y_zero_point=128),
           make_op("Int8Conv", ["xq", "w", "b"], ["y"], order="NHWC", kernel=1, Y_scale=0.05, Y_zero_point=128)]
    return init, make_net("predict", ops, ["data", "w", "b", *extra_inputs], ["y"])


def test_external_input_no_operator_reads_is_ignored_but_a_read_one_is_not(tmp_path: Path) -> None:
    init, predict = _tiny_nets(["data_loader_queue"])
    model = convert_nets(make_net("init", init), predict, input_size=4)
    assert [i.name for i in model.graph.input] == ["data"]
    predict.op.append(make_op("Int8Relu", ["data_loader_queue"], ["z"], Y_scale=0.05, Y_zero_point=128))
    with pytest.raises(Caffe2ImportError, match=r"2 external inputs that operators read.*data, data_loader_queue"):
        convert_nets(make_net("init", init), predict, input_size=4)


def test_duplicated_fill_in_init_net_last_one_wins(tmp_path: Path) -> None:
    init, predict = _tiny_nets([])
    stale = int8_fill("w", np.full((4, 1, 1, 3), 255, np.uint8), 0.01, 128)
    save_net(make_net("init", [stale, *init]), tmp_path / "init.pb")  # the stale fill comes first
    save_net(predict, tmp_path / "predict.pb")
    import_caffe2(tmp_path / "init.pb", tmp_path / "predict.pb", tmp_path / "m.onnx", input_size=4)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert (weights["w"] == 140).all()


def test_qlinear_arithmetic_stays_within_one_step_per_operator(zoo_net: dict, images: np.ndarray) -> None:
    """`--arithmetic qlinear` (onnxruntime's QLinear* operators): each operator, given the same
    inputs, lands at most one step from its engine's arithmetic, and on few outputs."""
    model = convert_nets(zoo_net["init"], zoo_net["predict"], trace_int8=True, arithmetic="qlinear")
    assert "ConvInteger" not in {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    produced = dict(zip([out.name for out in session.get_outputs()], session.run(None, {zoo_net["input"]: images[:2]})))
    forced = {int(name.split("/")[1]): nhwc(values) for name, values in produced.items()
              if name.startswith("int8_trace/")}
    per_op, _ = ref.run_net(read_constants(zoo_net["init"]), zoo_net["predict"], images[:2], forced=forced)
    steps = np.concatenate([np.abs(forced[i].astype(np.int32) - expected).ravel() for i, _, expected in per_op])
    assert steps.max() <= 1
    assert 0 < (steps > 0).mean() < 0.01, f"{(steps > 0).mean():.3%} of the int8 outputs differ"
