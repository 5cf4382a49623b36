"""Outputs: what `evaluate` and `label` share about the folder a run writes into, and what the
commands that write one file (`quantize`, `model build`, `model import-caffe2`) check of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputDirError(ValueError):
    """The output folder cannot take this run (not a folder, not writable, holding another run); the
    message says what to do."""


def check_not_a_file(path: Path) -> None:
    """OutputDirError when PATH is an existing file (checked before any work starts)."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} is a file, not a folder")


def make_output_dir(path: str | Path) -> Path:
    """PATH created as a folder, with its parents; an OutputDirError saying why when it cannot be."""
    path = Path(path)
    check_not_a_file(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot make the output folder there ({exc.strerror or exc})") from None
    return path


def check_output_file(path: str | Path, option: str = "--out", kind: str = ".onnx") -> Path:
    """PATH (given as OPTION, a KIND file) as a file that can be written, checked before any work
    (a model is written only after minutes of building or calibration): its folder is made, with
    its parents, and a file can be created there; an OutputDirError saying why otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder: {option} names the {kind} file to write")
    folder = make_output_dir(path.parent)
    try:
        # a file of our own, deleted at once: PATH itself, if it exists, is left as it is
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot write the output file there ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputDirError(f"{path}: cannot write the output file there (it exists and is read-only)")
    return path
