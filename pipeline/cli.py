"""The `pipeline` command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Evaluate and run int8 ONNX ImageNet classifiers with Ray Data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Build or import ONNX models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

from pipeline.caffe2.command import import_caffe2_command  # noqa: E402

model_app.command("import-caffe2")(import_caffe2_command)
