"""`pipeline model build` and `pipeline quantize`: the command-line side of pipeline.models and
pipeline.quantize (registered in pipeline/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.models import ARCHITECTURES, GENERATED, build_model
from pipeline.weights import WeightsError


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def build_command(
    arch: str = typer.Argument(..., help=f"architecture: {', '.join(ARCHITECTURES)}"),
    weights: Optional[str] = typer.Option(
        None, help=f"weights file (.pth/.pt, .npz, .safetensors) or '{GENERATED}' for seeded random weights; "
                   "default: the architecture's shipped checkpoint (efficientnet-lite0)"),
    out: Path = typer.Option(..., help="where to write the fp32 ONNX model"),
) -> None:
    """Write an fp32 ONNX classifier (opset 17, input `input` [N,3,224,224], output softmax probabilities)."""
    try:
        path = build_model(arch, weights, out)
    except (WeightsError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path} ({arch}, preprocessing preset {ARCHITECTURES[arch].preset})")
