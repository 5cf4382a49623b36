"""fp32 ONNX model -> int8 ONNX model (QDQ) with onnxruntime's quantisation tooling.

onnxruntime rewrites the graph; the activation ranges come from one of four calibration
methods: `l2` (ours, pipeline.calibration: the seed's L2-optimal histogram clipping) or
onnxruntime's own `minmax`, `entropy` and `percentile`. Weights are symmetric int8 per output
channel; activations uint8 (or int8); Softmax, and the logits it reads, stay float.

`quantize` is the `pipeline quantize` run (the command in pipeline/model_commands.py only parses its
options and prints its report): check, calibrate, write each int8 model, and with --eval compare them
with fp32 by pipeline.evaluate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import pyarrow.compute as pc
import pyarrow.parquet as pq
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from pipeline.calibration import BatchReader, collect_histograms, l2_optimal_range
from pipeline.config import Preset
from pipeline.errors import UserError
from pipeline.evaluate import evaluate
from pipeline.model_preset import attach_preset
from pipeline.onnx_model import ModelInfo
from pipeline.output import atomic_file, check_output_file, make_output_dir, write_json
from pipeline.preprocess import Normalizer, Preprocessor
from pipeline.run_checks import check_run
from pipeline.runtime import init_ray, map_after_read
from pipeline.sources import check_source, read_source
from pipeline.stats import kl_divergence

METHODS = ("l2", "minmax", "entropy", "percentile")
ORT_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
CALIBRATION_BATCH = 16
FLOAT_OPS = ("Softmax",)  # left in float: probabilities need the precision, and it is cheap
# A Gemm or MatMul output that no quantised op reads (the logits before the float Softmax, or the
# graph's output) is left float: onnxruntime's int8 kernels for them (QGemm, MatMulIntegerToFloat)
# write float from the int32 accumulator, so rounding it to 8 bits first would only add error, in
# the very values the top-1 and top-5 classes are read from.
FLOAT_OUTPUT_OPS = ("Gemm", "MatMul")


class QuantizeError(UserError):
    """Quantisation cannot proceed; the message says why."""


class _PreProcessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _onnxruntime_quietly():
    """onnxruntime's quantiser prints a line per calibration batch and its calibrators' settings on
    stdout, and advises twice per model, on the root logger, to run its graph pre-processing first
    (README: when that matters). Both go; failures still raise."""
    root = logging.getLogger()
    advice = _PreProcessingAdvice()
    root.addFilter(advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(advice)


def check_options(methods: list[str], activations: str) -> None:
    """The calibration methods and activation type asked for exist (checked before any work starts)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise QuantizeError(f"unknown calibration method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    if activations not in ACTIVATION_TYPES:
        raise QuantizeError(f"activations must be uint8 or int8, not {activations!r}")


# operators only a quantised model holds (ONNX's and onnxruntime's contrib ops): quantising such a
# model again would quantise around its int8 arithmetic, and onnxruntime does so without a word
QUANTISED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention")


def check_float_model(model_path: str | Path, model: onnx.ModelProto | None = None) -> None:
    """The model at MODEL_PATH (MODEL, when it is already loaded) holds no quantised operators
    (checked before any work starts)."""
    graph = (model or onnx.load(str(model_path), load_external_data=False)).graph
    quantised = sorted({n.op_type for n in graph.node if n.op_type in QUANTISED_OPS or n.op_type.startswith("QLinear")})
    if quantised:
        raise QuantizeError(f"{model_path}: the model already holds quantised operators ({', '.join(quantised)}); "
                            "give the fp32 model")


def l2_ranges(model_path: str, batches: list[np.ndarray]) -> TensorsData:
    histograms = collect_histograms(model_path, batches)
    ranges = {}
    for name, histogram in histograms.items():
        lo, hi = l2_optimal_range(histogram)
        ranges[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
    # onnxruntime only knows its own methods; a range table it did not compute is labelled
    # MinMax, which it reads as "use these ranges as they are".
    return TensorsData(CalibrationMethod.MinMax, ranges)


def _named_model(model_path: str) -> onnx.ModelProto:
    """The model with every node named (onnxruntime's exclusion lists go by node name)."""
    model = onnx.load(model_path)
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    return model


def quantize_model(
    model_path: str | Path,
    batches: list[np.ndarray],
    out: str | Path,
    method: str = "l2",
    activations: str = "uint8",
    preset: Preset | None = None,
) -> Path:
    """Calibrate on `batches` (preprocessed float32 NCHW inputs) and write the int8 QDQ model, carrying
    PRESET (the preprocessing of those inputs) in its metadata when given."""
    check_options([method], activations)
    if not batches:
        raise QuantizeError("no calibration images")
    model_path, out = str(model_path), Path(out)
    model = _named_model(model_path)
    check_float_model(model_path, model)
    make_output_dir(out.parent)
    options = dict(
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=ACTIVATION_TYPES[activations],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[n.name for n in model.graph.node if n.op_type in FLOAT_OPS],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                       "OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OPS)},
    )
    with (tempfile.TemporaryDirectory(prefix="pipeline-quantize-") as tmp, _onnxruntime_quietly(),
          atomic_file(out) as written):
        named_path = str(Path(tmp) / "model.onnx")
        onnx.save(model, named_path)
        if method == "l2":
            # onnxruntime's calibration cache: given an existing range table it skips its own calibration.
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(l2_ranges(named_path, batches), cache)
            quantize_static(named_path, str(written), None, calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=cache, **options)
        else:
            # One batch per collection step: onnxruntime's histogram calibrators hold every
            # intermediate tensor of a step in memory.
            options["extra_options"]["CalibStridedMinMax"] = 1
            quantize_static(named_path, str(written), BatchReader(ModelInfo.from_path(model_path).input_name, batches),
                            calibrate_method=ORT_METHODS[method], **options)
        if preset is not None:
            quantized = onnx.load(str(written))
            attach_preset(quantized, preset)
            onnx.save(quantized, str(written))
    return out


@dataclass
class CalibrationSet:
    keys: list[str]
    batches: list[np.ndarray]
    errors: int  # records that could not be read or decoded, left out of calibration

    @property
    def images(self) -> int:
        return len(self.keys)


def read_calibration_set(
    data: str, preset: Preset, images: int | None = None, fmt: str | None = None,
    batch_size: int = CALIBRATION_BATCH,
) -> CalibrationSet:
    """Calibration inputs read and preprocessed by the evaluation pipeline itself (any input
    format, the preset's exact preprocessing); labels are not needed. Ray must be running."""
    source = read_source(data, fmt=fmt, limit=images)
    rows = map_after_read(source.dataset, Preprocessor(preset, require_label=False), source.recut_rows,
                          batch_size=None, batch_format="numpy")
    # in the source's order: onnxruntime's histogram calibrators (entropy, percentile) depend on the
    # order of the batches, and the same images must give the same model
    rows.context.execution_options.preserve_order = True
    keys, batches, errors = [], [], 0
    normalize = Normalizer(preset)
    for batch in rows.iter_batches(batch_size=batch_size, batch_format="numpy"):
        good = batch["error"] == ""
        errors += int((~good).sum())
        if good.any():
            keys += [str(k) for k in batch["key"][good]]
            batches.append(normalize(batch["crop"][good]))
    if not keys:
        raise QuantizeError(f"{data}: no readable calibration images ({errors} unreadable)")
    return CalibrationSet(keys, batches, errors)


def class_distributions(output: Path) -> dict[str, np.ndarray]:
    """Each evaluated image's class probabilities, by key, from an evaluation run with probabilities."""
    table = pq.read_table(output / "predictions.parquet", columns=["key", "probs", "error"])
    table = table.filter(pc.equal(table["error"], ""))
    probs = table["probs"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return dict(zip(table["key"].to_pylist(), probs))


def accuracy_report(
    fp32_model: str, int8_models: dict[str, Path], data: str, preset: str | Preset, output: Path,
    labels: str | None = None, limit: int | None = None, calibration_keys: set[str] = frozenset(),
    fmt: str | None = None,
) -> dict:
    """fp32 and each int8 model evaluated by pipeline.evaluate on the same images: top-1/top-5,
    their change, how often int8 and fp32 agree on the top-1 class, and the mean KL divergence of
    the int8 class distribution from fp32's. Top-1 moves in whole images (0.08 points of 1,300), so
    two close methods can swap places on it by chance; the KL divergence weighs how far every
    image's distribution moved, and separates them with far fewer images. FMT: DATA's format, detected
    once here when not given rather than by each evaluation."""
    fmt = fmt or check_source(data, None, labels)
    fp32 = evaluate(fp32_model, data, preset, str(output / "fp32"), fmt=fmt, labels=labels, limit=limit,
                    probabilities=True)
    fp32_probs = class_distributions(output / "fp32")
    report = {
        "data": fp32["data"], "preset": fp32["preset"], "images": fp32["evaluated"],
        "calibration_overlap": len(calibration_keys & fp32_probs.keys()),
        "fp32": {"model": fp32["model"], "top1": fp32["top1"], "top5": fp32["top5"]},
        "int8": {},
    }
    for method, model in int8_models.items():
        metrics = evaluate(str(model), data, preset, str(output / method), fmt=fmt, labels=labels, limit=limit,
                           probabilities=True)
        int8_probs = class_distributions(output / method)
        shared = sorted(fp32_probs.keys() & int8_probs.keys())
        reference = np.array([fp32_probs[k] for k in shared]).reshape(len(shared), -1)
        quantised = np.array([int8_probs[k] for k in shared]).reshape(len(shared), -1)
        report["int8"][method] = {
            "model": metrics["model"], "top1": metrics["top1"], "top5": metrics["top5"],
            "top1_change": metrics["top1"] - fp32["top1"], "top5_change": metrics["top5"] - fp32["top5"],
            # argmax, as top_k ranks ties: lowest class id first
            "top1_agreement": float(np.mean(reference.argmax(1) == quantised.argmax(1))) if shared else 0.0,
            "kl_from_fp32": float(np.mean(kl_divergence(reference, quantised))) if shared else 0.0,
        }
    return report


@dataclass(frozen=True)
class QuantizeOutputs:
    models: dict[str, Path]  # the int8 model of each calibration method
    report: Path  # the accuracy report, written when the models are evaluated


def quantize_outputs(out: Path, methods: list[str], activations: str, report: Optional[Path],
                     evaluated: bool) -> QuantizeOutputs:
    """The files a quantisation writes: OUT for one method, OUT-METHOD.onnx for each of several, and
    REPORT (default: OUT's folder/quantize-report.json); checked, with METHODS and ACTIVATIONS, before
    any work starts (a model is written only after minutes of calibration)."""
    check_options(methods, activations)
    if len(methods) == 1:
        models = {methods[0]: out}
    else:
        models = {m: out.with_name(f"{out.stem}-{m}{out.suffix or '.onnx'}") for m in methods}
    for path in models.values():
        check_output_file(path)
    report_path = report or out.parent / "quantize-report.json"
    if evaluated:
        check_output_file(report_path, "--report", "JSON")
    return QuantizeOutputs(models, report_path)


def quantize(model: str | Path, preset: str | Preset, calibration: str, outputs: QuantizeOutputs, *,
             images: Optional[int], activations: str, fmt: Optional[str] = None, eval_data: Optional[str] = None,
             labels: Optional[str] = None, eval_limit: Optional[int] = None, address: Optional[str] = None,
             say: Callable[[str], None] = print) -> Optional[dict]:
    """Quantise the fp32 MODEL (preprocessed by PRESET) into each of OUTPUTS.models, calibrated on the
    first IMAGES records of CALIBRATION (read as FMT); with EVAL_DATA (and LABELS), evaluate fp32 and
    every int8 model on its first EVAL_LIMIT records, write OUTPUTS.report and return it. SAY tells the
    user each step. The model, the preset and both inputs are checked before Ray starts."""
    checked = check_run(str(model), preset, calibration, fmt, check_model=lambda info: check_float_model(info.path))
    eval_format = check_source(eval_data, None, labels) if eval_data else None
    init_ray(address)
    calib = read_calibration_set(calibration, checked.preset, images, fmt=checked.fmt)
    say(f"calibrating on {calib.images} images of {calibration}"
        + (f" ({calib.errors} unreadable, left out)" if calib.errors else ""))
    for name, path in outputs.models.items():
        quantize_model(model, calib.batches, path, name, activations, checked.preset)
        say(f"wrote {path} (int8, {name} calibration)")
    if not eval_data:
        return None
    count = len(outputs.models)
    say(f"evaluating fp32 and {count} int8 model{'s' * (count > 1)} on {eval_data}")
    result = accuracy_report(str(model), outputs.models, eval_data, preset, outputs.report.parent / "quantize-eval",
                             labels=labels, limit=eval_limit, calibration_keys=set(calib.keys), fmt=eval_format)
    result["calibration"] = {"data": calibration, "images": calib.images, "unreadable": calib.errors}
    write_json(outputs.report, result)
    return result
