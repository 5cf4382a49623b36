"""`pipeline model build` and `pipeline quantize`: the command-line side of pipeline.models and
pipeline.quantize (registered in pipeline/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.console import PRESET_HELP, InputFormat, format_help, format_name, model_and_preset, reported_failures
from pipeline.models import ARCHITECTURES, GENERATED, build_model
from pipeline.output import check_output_file


def build_command(
    arch: str = typer.Argument(..., help=f"architecture: {', '.join(ARCHITECTURES)}"),
    weights: Optional[str] = typer.Option(
        None, help=f"weights file (.pth/.pt, .npz, .safetensors) or '{GENERATED}' for seeded random weights; "
                   "default: the architecture's shipped checkpoint (efficientnet-lite0)"),
    out: Path = typer.Option(..., help="where to write the fp32 ONNX model"),
) -> None:
    """Write an fp32 ONNX classifier (opset 17, input `input` [N,3,224,224], output softmax probabilities)."""
    with reported_failures(os_errors=True):
        path = build_model(arch, weights, out)
    typer.echo(f"wrote {path} ({arch}, preprocessing preset {ARCHITECTURES[arch].preset})")


def int8_paths(out: Path, methods: list[str]) -> dict[str, Path]:
    """OUT for one method; OUT-METHOD.onnx for each of several."""
    if len(methods) == 1:
        return {methods[0]: out}
    return {m: out.with_name(f"{out.stem}-{m}{out.suffix or '.onnx'}") for m in methods}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fp32 vs int8 on {report['images']} images of {report['data']} (preset {report['preset']})")
    for column in ("model", "top-1", "top-5", "top-1 change", "top-1 agreement", "KL from fp32"):
        table.add_column(column, justify="right", no_wrap=column == "model")  # "int8 percentile" on one line
    table.add_row("fp32", f"{100 * report['fp32']['top1']:.2f}%", f"{100 * report['fp32']['top5']:.2f}%", "", "", "")
    for method, row in report["int8"].items():
        table.add_row(f"int8 {method}", f"{100 * row['top1']:.2f}%", f"{100 * row['top5']:.2f}%",
                      f"{100 * row['top1_change']:+.2f}", f"{100 * row['top1_agreement']:.2f}%",
                      f"{row['kl_from_fp32']:.5f}")
    Console().print(table)


def quantize_command(
    model: Optional[Path] = typer.Option(None, help="fp32 ONNX classifier; default: EfficientNet-Lite0 from its "
                                                     "real checkpoint"),
    calibration: str = typer.Option(..., help="calibration images: any input the pipeline reads"),
    out: Path = typer.Option(..., help="int8 ONNX model to write (OUT-METHOD.onnx when several methods)"),
    images: Optional[int] = typer.Option(500, min=1, help="calibrate on the first N records"),
    method: list[str] = typer.Option(["l2"], help="l2 (default), minmax, entropy or percentile; repeat for several"),
    preset: Optional[str] = typer.Option(None, help=f"{PRESET_HELP} (the one the model is evaluated with)"),
    activations: str = typer.Option("uint8", help="activation type: uint8 or int8"),
    format: Optional[InputFormat] = typer.Option(None, "--format", help=format_help("--calibration")),
    labels: Optional[Path] = typer.Option(None, help="labels file for an --eval image folder"),
    eval: Optional[str] = typer.Option(None, "--eval", help="labelled images to compare fp32 and int8 on"),
    eval_limit: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N records of --eval"),
    report: Optional[Path] = typer.Option(None, help="report JSON (default: OUT's folder/quantize-report.json)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: a local single-node Ray"),
) -> None:
    """Quantise an fp32 model to int8 (QDQ) with calibration images read by the pipeline."""
    from pipeline.output import write_json
    from pipeline.quantize import (accuracy_report, check_float_model, check_options, quantize_model,
                                   read_calibration_set)
    from pipeline.run_checks import check_run
    from pipeline.runtime import init_ray
    from pipeline.sources import check_source

    with reported_failures(os_errors=True):  # OSError: the model could not be written
        check_options(method, activations)
        outputs = int8_paths(out, method)
        for path in outputs.values():
            check_output_file(path)
        report_path = report or out.parent / "quantize-report.json"
        if eval:
            check_output_file(report_path, "--report", "JSON")
        model, preset = model_and_preset(model, preset)
        checked = check_run(str(model), preset, calibration, format_name(format),
                            check_model=lambda info: check_float_model(info.path))
        eval_format = check_source(eval, None, str(labels) if labels else None) if eval else None
        init_ray(address)
        calib = read_calibration_set(calibration, checked.preset, images, fmt=checked.fmt)
        typer.echo(f"calibrating on {calib.images} images of {calibration}"
                   + (f" ({calib.errors} unreadable, left out)" if calib.errors else ""))
        for name, path in outputs.items():
            quantize_model(model, calib.batches, path, name, activations, checked.preset)
            typer.echo(f"wrote {path} (int8, {name} calibration)")
        if eval:
            typer.echo(f"evaluating fp32 and {len(outputs)} int8 model{'s' * (len(outputs) > 1)} on {eval}")
            result = accuracy_report(str(model), outputs, eval, preset, report_path.parent / "quantize-eval",
                                     labels=str(labels) if labels else None, limit=eval_limit,
                                     calibration_keys=set(calib.keys), fmt=eval_format)
            result["calibration"] = {"data": calibration, "images": calib.images, "unreadable": calib.errors}
            write_json(report_path, result)
            print_report(result)
            if result["calibration_overlap"]:
                typer.secho(f"warning: {result['calibration_overlap']} evaluation images were also calibration images",
                            fg=typer.colors.YELLOW, err=True)
            typer.echo(f"report: {report_path}")
