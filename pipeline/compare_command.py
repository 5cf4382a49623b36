"""`pipeline compare`: the command-line side of pipeline.compare (registered in pipeline/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.console import (PRESET_HELP, REAL_LABELS_HELP, InputFormat, ProgressReporter, format_help, format_name,
                              preset_of_model, progress_bar, reported_failures, say)
from pipeline.output import exclusive_output


def print_comparison(comparison: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def percent(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    table = Table(title=f"{comparison['images']} images, baseline {comparison['baseline']}")
    for column in ("model", "top-1", "top-5", "ReaL top-1", "ECE", "agreement", "right->wrong", "wrong->right",
                   "McNemar p", "KL"):
        table.add_column(column, justify="right", no_wrap=column == "model")
    against = {c["name"]: c for c in comparison["comparisons"]}
    for model in comparison["models"]:
        c = against.get(model["name"])
        table.add_row(model["name"], percent(model["top1"]), percent(model["top5"]), percent(model.get("real_top1")),
                      percent(model["ece"]),
                      *([percent(c["top1_agreement"]), str(c["right_to_wrong"]), str(c["wrong_to_right"]),
                         f"{c['mcnemar_p']:.3g}", f"{c['mean_kl_from_baseline']:.5f}"] if c else [""] * 5))
    Console(width=max(Console().width, 140)).print(table)  # ten columns: not cut to a pipe's 80


def compare_command(
    model: list[Path] = typer.Option(..., help="ONNX classifier; repeat: the first is the baseline"),
    data: str = typer.Option(..., help="labelled images, any input `evaluate` reads"),
    preset: Optional[str] = typer.Option(None, help=f"{PRESET_HELP}; given, it is used for every model"),
    output: Path = typer.Option(Path("results/compare"), help="folder for comparison.json, report.html and a "
                                                              "folder per model"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join from one of its nodes: 'auto' or "
                                                     "HOST:PORT; default: start a local single-node Ray"),
    format: Optional[InputFormat] = typer.Option(None, "--format", help=format_help("--data")),
    labels: Optional[Path] = typer.Option(None, help="labels file (KEY CLASS_INDEX) for an image folder or "
                                                     ".tar shards"),
    limit: Optional[int] = typer.Option(None, min=1, help="compare on the first N records only"),
    batch_size: int = typer.Option(32, min=1, help="images per inference call (dynamic-batch models)"),
    real_labels: Optional[Path] = typer.Option(None, help=REAL_LABELS_HELP),
) -> None:
    """Compare models on the same images in one pass: accuracy with confidence intervals, calibration,
    ReaL, and each model against the first (agreement, flips, McNemar, KL), with report.html."""
    from pipeline.compare import compare

    left = f"the comparison stopped before its end: {output} holds no result of it"
    with reported_failures(interrupted_message=left):
        with exclusive_output(output, "compare"):
            presets = [preset or preset_of_model(m) for m in model]
            with progress_bar() as progress:
                comparison = compare([str(m) for m in model], data, presets, str(output), fmt=format_name(format),
                                     labels=str(labels) if labels else None, limit=limit, batch_size=batch_size,
                                     address=address, real_labels=str(real_labels) if real_labels else None,
                                     on_progress=ProgressReporter(progress, "comparing"))
    print_comparison(comparison)
    for note in dict.fromkeys(m["real_note"] for m in comparison["models"] if m.get("real_note")):
        say(note)
    say(f"comparison: {output / 'comparison.json'}  report: {output / 'report.html'}")
