"""The `pipeline` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table
from ray.exceptions import RayError

from pipeline.config import ConfigError
from pipeline.inference import ModelError
from pipeline.sources import SourceError

app = typer.Typer(
    help="Evaluate and run int8 ONNX ImageNet classifiers with Ray Data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Build or import ONNX models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console(stderr=True)
USER_ERRORS = (ConfigError, ModelError, SourceError, FileNotFoundError)


def ray_failure_reason(exc: Exception) -> str:
    """The last line of the remote error (its exception and message), not the whole remote traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False)


class ProgressReporter:
    """on_progress callback that drives a rich progress bar."""

    def __init__(self, progress: Progress, description: str):
        import time

        self.clock = time.perf_counter
        self.started = self.clock()
        self.progress = progress
        self.task = progress.add_task(description, total=None, rate=0.0)

    def __call__(self, done: int, total: Optional[int]) -> None:
        rate = done / max(self.clock() - self.started, 1e-9)
        self.progress.update(self.task, completed=done, total=total, rate=rate)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="int8 (or fp32) ONNX classifier, input [N,3,H,W]"),
    data: str = typer.Option(..., help="image folder with labels.txt, Parquet shards (folder or glob)"),
    preset: str = typer.Option("torch", help="preprocessing preset name in conf/ (caffe2, torch, tf127)"),
    config: Optional[Path] = typer.Option(None, help="preprocessing preset YAML file (instead of --preset)"),
    output: Path = typer.Option(Path("results"), help="folder for metrics.json and predictions.parquet"),
    address: Optional[str] = typer.Option(None, help="Ray cluster: 'auto', HOST:PORT or ray://HOST:PORT; "
                                                     "default: start a local single-node Ray"),
    format: Optional[str] = typer.Option(None, "--format", help="input format; detected from --data if absent"),
    labels: Optional[Path] = typer.Option(None, help="labels file (FILE CLASS_INDEX) for an image folder"),
    limit: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N records"),
    batch_size: int = typer.Option(32, min=1, help="images per inference call (dynamic-batch models)"),
) -> None:
    """Measure top-1/top-5 accuracy and throughput of a classifier on labelled ImageNet images."""
    from pipeline.evaluate import evaluate as run_evaluation

    try:
        with progress_bar() as progress:
            metrics = run_evaluation(
                str(model), data, str(config) if config else preset, str(output), fmt=format,
                labels=str(labels) if labels else None, limit=limit, batch_size=batch_size, address=address,
                on_progress=ProgressReporter(progress, "evaluating"),
            )
    except USER_ERRORS as exc:
        fail(str(exc))
    except RayError as exc:
        fail(f"the Ray pipeline failed: {ray_failure_reason(exc)}")
    print_summary(metrics, output)


def print_summary(metrics: dict, output: Path) -> None:
    table = Table(title=f"{Path(metrics['model']).name} on {metrics['data']} ({metrics['preset']})")
    for column in ("images", "evaluated", "errors", "top-1", "top-5", "wall s", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(str(metrics["images"]), str(metrics["evaluated"]), str(metrics["errors"]),
                  f"{100 * metrics['top1']:.2f}%", f"{100 * metrics['top5']:.2f}%",
                  f"{metrics['wall_s']:.1f}", f"{metrics['images_per_s']:.1f}")
    Console().print(table)
    for sample in metrics["error_samples"][:5]:
        console.print(f"  error row: {sample['key']}: {sample['reason']}", highlight=False)
    console.print(f"metrics: {output / 'metrics.json'}  predictions: {output / 'predictions.parquet'}",
                  highlight=False)


@app.command()
def prepare(
    images: Path = typer.Option(..., help="image folder"),
    out: Path = typer.Option(..., help="output folder"),
    labels: Optional[Path] = typer.Option(None, help="labels file (default: IMAGES/labels.txt)"),
    shard_size: int = typer.Option(1000, min=1, help="records per Parquet shard"),
) -> None:
    """Write Parquet shards (key, image bytes as stored, label) from an image folder."""
    from pipeline.prepare import write_parquet_shards

    try:
        counts = write_parquet_shards(str(images), str(out), str(labels) if labels else None, shard_size)
    except USER_ERRORS as exc:
        fail(str(exc))
    console.print(f"wrote {counts['records']} records in {counts['shards']} shards to {out}"
                  + (f" ({counts['unreadable']} unreadable files kept as error rows)" if counts["unreadable"] else ""),
                  highlight=False)


from pipeline.caffe2.command import import_caffe2_command  # noqa: E402

model_app.command("import-caffe2")(import_caffe2_command)
