"""What tests share besides fixtures: the paths of the data in ../shared, the CLI run as a user runs
it, and small generated inputs (images, folders, ONNX classifiers)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VAL_1300 = SHARED / "data" / "imagenet-val-1300"
SAMPLE_1000 = SHARED / "data" / "imagenet-sample-1000"
MOBILENET_INT8 = SHARED / "models" / "mobilenetv2-12-int8.onnx"
RESNET50_INT8 = SHARED / "models" / "resnet50-int8-generated.onnx"


def need(path: Path) -> Path:
    """PATH from ../shared, or skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared ImageNet data and models live in ../shared")
    return path


def run_cli(*args: object, cwd: Path = REPO,
            extra_env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` as a user runs it, in its own process (its own Ray): output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def start_cli(*args: object) -> subprocess.Popen:
    """`python -m pipeline ARGS` started in a session of its own (a signal to its process group reaches
    the driver and the Ray it starts, as a Ctrl-C in a terminal does), stdout and stderr as one text."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def jpeg_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0, fmt: str = "JPEG") -> bytes:
    """An image of random pixels of SIZE (width, height) in MODE, encoded as FMT."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode] if mode != "P" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, "L" if channels == 1 else mode)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def subset_folder(src: Path, dst: Path, count: int) -> Path:
    """The first COUNT images of SRC (by key) with their labels, linked into DST."""
    lines = sorted((src / "labels.txt").read_text().split("\n"))
    lines = [line for line in lines if line.strip()][:count]
    dst.mkdir(parents=True, exist_ok=True)
    for line in lines:
        name = line.split()[0]
        (dst / name).symlink_to(src / name)
    (dst / "labels.txt").write_text("\n".join(lines) + "\n")
    return dst


def save_classifier(path: Path, nodes: list, name: str, initializers: tuple = (), input_type: int = TensorProto.FLOAT,
                    opset: int = 13, size: int = 224, output_shape: tuple = ("N", 1000)) -> Path:
    """A graph of NODES from `input` (N x 3 x SIZE x SIZE of INPUT_TYPE) to the last node's output
    (declared OUTPUT_SHAPE float: N x 1000 by default), saved at PATH: the shape of classifier the
    pipeline runs."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", input_type, ["N", 3, size, size])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, list(output_shape))], list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    return path
