"""`pipeline model import-caffe2`: the command-line face of `pipeline.caffe2.importer`."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.console import reported_failures


def import_caffe2_command(
    init: Path = typer.Option(..., "--init", help="Caffe2 init_net (weights): .pb binary or .pbtxt text."),
    predict: Path = typer.Option(..., "--predict", help="Caffe2 predict_net (graph): .pb binary or .pbtxt text."),
    out: Path = typer.Option(..., "--out", help="ONNX model to write."),
    input_size: int = typer.Option(224, "--input-size", help="Height and width of the NCHW image input."),
    preset: str = typer.Option("caffe2", "--preset",
                               help="Preprocessing preset written into the model's metadata (name or YAML file); "
                                    "both Caffe2 zoo int8 nets use caffe2."),
    arithmetic: str = typer.Option("exact", "--arithmetic",
                                   help="exact: each engine's own arithmetic (bit-exact, slower); qlinear: "
                                        "onnxruntime's QLinear* operators (faster, within one step per operator). "
                                        "See docs/caffe2.md."),
) -> None:
    """Convert a Caffe2 int8 predictor (e.g. the model zoo's quantised ResNet-50) into an int8 ONNX model."""
    # Imported here so `pipeline --help` does not pay for onnx and onnxruntime.
    from pipeline.caffe2.importer import import_caffe2

    with reported_failures(prefix="import-caffe2: ", os_errors=True):
        model = import_caffe2(init, predict, out, input_size=input_size, preset=preset, arithmetic=arithmetic)
    graph = model.graph
    ops = sorted({node.op_type for node in graph.node})
    typer.echo(
        f"wrote {out}: input {graph.input[0].name} [N, 3, {input_size}, {input_size}], "
        f"{len(graph.node)} ONNX nodes ({', '.join(ops)})"
    )
