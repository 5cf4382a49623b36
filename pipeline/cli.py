"""The `pipeline` command line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, load_preset
from pipeline.console import (PRESET_HELP, REAL_LABELS_HELP, InputFormat, ProgressReporter, fail, format_help,
                              format_name, model_and_preset, progress_bar, reported_failures, say)
from pipeline.output import exclusive_output

app = typer.Typer(
    help="Evaluate and run int8 ONNX ImageNet classifiers with Ray Data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Build or import ONNX models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def preset_or_config(preset: Optional[str], config: Optional[Path]) -> Optional[str]:
    """The preset asked for. --config FILE.yaml is the old spelling of --preset FILE.yaml, kept
    (hidden) for existing scripts; given both, they must name the same preset, as neither can be
    known to be the one meant."""
    if config is None:
        return preset
    if preset is not None and load_preset(preset) != load_preset(str(config)):
        raise ConfigError(f"--preset {preset} and --config {config} are different presets: give one "
                          "(--preset takes a name in conf/ or a preset YAML file)")
    return str(config)


@app.command()
def evaluate(
    model: Optional[Path] = typer.Option(None, help="int8 (or fp32) ONNX classifier, input [N,3,H,W]; "
                                                     "default: EfficientNet-Lite0 from its real checkpoint"),
    data: str = typer.Option(..., help="image folder (labels.txt or --labels), Parquet shards (folder or glob), "
                                       "Caffe/Caffe2 LMDB database, or .tar shards (file, folder or glob)"),
    preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
    config: Optional[Path] = typer.Option(None, hidden=True, help="old spelling of --preset FILE.yaml"),
    output: Path = typer.Option(Path("results"), help="folder for metrics.json and predictions.parquet"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join from one of its nodes: 'auto' or "
                                                     "HOST:PORT; default: start a local single-node Ray"),
    format: Optional[InputFormat] = typer.Option(None, "--format", help=format_help("--data")),
    labels: Optional[Path] = typer.Option(None, help="labels file (KEY CLASS_INDEX, KEY as the records are "
                                                     "named) for an image folder or .tar shards"),
    limit: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N records"),
    batch_size: int = typer.Option(32, min=1, help="images per inference call (dynamic-batch models)"),
    real_labels: Optional[Path] = typer.Option(None, help=REAL_LABELS_HELP),
) -> None:
    """Measure top-1/top-5 accuracy and throughput of a classifier on labelled ImageNet images."""
    from pipeline.evaluate import evaluate as run_evaluation

    left = f"the evaluation stopped before its end: {output} holds no result of it"
    with reported_failures(interrupted_message=left):
        with exclusive_output(output, "evaluate"):
            model, preset = model_and_preset(model, preset_or_config(preset, config))
            with progress_bar() as progress:
                metrics = run_evaluation(
                    str(model), data, preset, str(output), fmt=format_name(format),
                    labels=str(labels) if labels else None, limit=limit, batch_size=batch_size, address=address,
                    on_progress=ProgressReporter(progress, "evaluating"),
                    real_labels=str(real_labels) if real_labels else None,
                )
    print_summary(metrics, output)
    if not metrics["evaluated"]:
        fail(nothing_scored(metrics, output))


def nothing_scored(metrics: dict, output: Path) -> str:
    """Why a run scored no image: its most common error reason, and what to do about a missing label."""
    from pyarrow import parquet

    from pipeline.preprocess import label_error
    from pipeline.sources.base import NO_LABEL

    if not metrics["errors"]:
        return f"no image could be scored: {metrics['data']} holds no records"
    errors = parquet.read_table(output / "predictions.parquet", columns=["error"])["error"].to_pylist()
    reason, count = Counter(errors).most_common(1)[0]
    hint = ("; labels come with the input or from --labels, and a labels file must name each record by its key, "
            "as the error rows above do"
            if reason == label_error(NO_LABEL) else "")
    return f"no image could be scored: {metrics['errors']} error rows, {count} of them {reason!r}{hint}"


def time_line(time: dict) -> str:
    """Where the run's time went, in one line: CPU ms per image by stage, and the start-up."""
    stages = ", ".join(f"{stage} {1000 * seconds:.2f}" for stage, seconds in time["cpu_s_per_image"].items())
    return (f"CPU ms per image: {stages}; start-up: Ray {time['ray_start_s']:.1f} s, "
            f"first prediction {time['first_prediction_s']:.1f} s after the command started")


def print_summary(metrics: dict, output: Path) -> None:
    # the title on a line of its own: a table wraps its title, and this one holds the data's path
    Console(soft_wrap=True).print(f"{Path(metrics['model']).name} on {metrics['data']} ({metrics['preset']})",
                                  markup=False, highlight=False)
    table = Table()
    for column in ("images", "evaluated", "errors", "top-1", "top-5", "wall s", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(str(metrics["images"]), str(metrics["evaluated"]), str(metrics["errors"]),
                  f"{100 * metrics['top1']:.2f}%", f"{100 * metrics['top5']:.2f}%",
                  f"{metrics['wall_s']:.1f}", f"{metrics['images_per_s']:.1f}")
    Console().print(table)
    say(time_line(metrics["time"]))
    for sample in metrics["error_samples"][:5]:
        say(f"  error row: {sample['key']}: {sample['reason']}")
    if metrics.get("real_note"):
        say(metrics["real_note"])
    say(f"metrics: {output / 'metrics.json'}  predictions: {output / 'predictions.parquet'}")
    say(f"report: {output / 'report.html'}")


@app.command()
def prepare(
    images: Path = typer.Option(..., help="image folder"),
    out: Path = typer.Option(..., help="output folder"),
    labels: Optional[Path] = typer.Option(None, help="labels file (default: IMAGES/labels.txt)"),
    shard_size: int = typer.Option(1000, min=1, help="records per Parquet shard"),
    format: str = typer.Option("parquet", "--format", help="parquet, lmdb-datum (Caffe Datum records) "
                                                          "or lmdb-caffe2 (Caffe2 TensorProtos records)"),
    encoded: bool = typer.Option(True, "--encoded/--raw", help="LMDB: image files as stored, or raw BGR pixels"),
    resize: Optional[int] = typer.Option(None, min=1, help="LMDB: scale the shorter side to N pixels first"),
    overwrite: bool = typer.Option(False, help="Parquet: replace the shards OUT holds (refused otherwise)"),
) -> None:
    """Write Parquet shards (key, image bytes as stored, label), or an LMDB database, from an image folder."""
    labels_file = str(labels) if labels else None
    with reported_failures():
        if format == "parquet":
            from pipeline.writers.parquet import write_parquet_shards

            counts = write_parquet_shards(str(images), str(out), labels_file, shard_size, overwrite)
            report = f"wrote {counts['records']} records in {counts['shards']} shards to {out}" + (
                f" ({counts['unreadable']} unreadable files kept as error rows)" if counts["unreadable"] else "")
        elif overwrite:
            fail("--overwrite replaces Parquet shards: an LMDB database is written into a new folder")
        else:
            from pipeline.writers.lmdb import prepare_lmdb

            report = prepare_lmdb(str(images), str(out), labels_file, format, encoded, resize)
    say(report)


@app.command()
def label(
    model: Optional[Path] = typer.Option(None, help="int8 (or fp32) ONNX classifier, input [N,3,H,W]; "
                                                     "default: EfficientNet-Lite0 from its real checkpoint"),
    data: str = typer.Option(..., help="image folder (any depth), .tar shards (file, folder or glob), "
                                       "Parquet shards, or a Caffe/Caffe2 LMDB database"),
    output: Path = typer.Option(..., help="folder for labels/, errors/ and manifest.json"),
    top_k: int = typer.Option(5, min=1, max=1000, help="classes kept per image, best first"),
    preset: Optional[str] = typer.Option(None, help=PRESET_HELP),
    format: Optional[InputFormat] = typer.Option(None, "--format", help=format_help("--data")),
    resume: bool = typer.Option(False, help="finish an interrupted run into OUTPUT, skipping the shards it wrote"),
    overwrite: bool = typer.Option(False, help="discard what OUTPUT holds and label again"),
    shard_size: int = typer.Option(1000, min=1, help="images per output shard for image folders, at most "
                                                     "per output shard for Parquet (cut at row groups) "
                                                     "and uncompressed tar (cut at members)"),
    batch_size: int = typer.Option(32, min=1, help="images per inference call (dynamic-batch models)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join from one of its nodes: 'auto' or "
                                                     "HOST:PORT; default: start a local single-node Ray"),
) -> None:
    """Label every image of an archive with the model's top-k classes, exactly once and resumable."""
    from pipeline.label import AlreadyFinished, label as run_labelling

    try:
        with reported_failures(ray_advice=f"; {output} keeps the units finished so far: --resume finishes the run "
                                          "with the same options, --overwrite starts again",
                               interrupted_message=f"{output} keeps the units finished so far: --resume finishes "
                                                   "the run with the same options"):
            with exclusive_output(output, "label"):
                model, preset = model_and_preset(model, preset)
                with progress_bar() as progress:
                    manifest = run_labelling(
                        str(model), data, str(output), top_k=top_k, preset=preset, fmt=format_name(format),
                        resume=resume, overwrite=overwrite, unit_size=shard_size, batch_size=batch_size,
                        address=address,
                        on_progress=ProgressReporter(progress, "labelling", start_on_first_call=True),
                    )
    except AlreadyFinished as finished:
        say(str(finished))
        return
    say(f"{manifest['images']} images: {manifest['labelled']} labelled, {manifest['errors']} errors "
        f"({manifest['this_run_images']} in this run, {manifest['images_per_s']:.1f} images/s); "
        f"{len(manifest['shards'])} shards in {output}")


from pipeline.caffe2.command import import_caffe2_command  # noqa: E402

model_app.command("import-caffe2")(import_caffe2_command)

from pipeline.model_commands import build_command, quantize_command  # noqa: E402

model_app.command("build")(build_command)
app.command("quantize")(quantize_command)

from pipeline.compare_command import compare_command  # noqa: E402

app.command("compare")(compare_command)
