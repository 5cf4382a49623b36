"""`pipeline model build` and `pipeline quantize`: the command-line side of pipeline.models and
pipeline.quantize (registered in pipeline/cli.py): options in, the run's report out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.console import PRESET_HELP, InputFormat, format_help, format_name, model_and_preset, reported_failures
from pipeline.models import ARCHITECTURES, GENERATED, build_model


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
    from pipeline.quantize import quantize, quantize_outputs

    with reported_failures(os_errors=True):  # OSError: the model could not be written
        outputs = quantize_outputs(out, method, activations, report, evaluated=bool(eval))
        model, preset = model_and_preset(model, preset)
        result = quantize(model, preset, calibration, outputs, images=images, activations=activations,
                          fmt=format_name(format), eval_data=eval, labels=str(labels) if labels else None,
                          eval_limit=eval_limit, address=address, say=typer.echo)
    if result is None:
        return
    print_report(result)
    if result["calibration_overlap"]:
        typer.secho(f"warning: {result['calibration_overlap']} evaluation images were also calibration images",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(f"report: {outputs.report}")
