"""Outputs: what `evaluate` and `label` share about the folder a run writes into, what the commands
that write one file (`quantize`, `model build`, `model import-caffe2`) check of it, and the one way
every result file is written: whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from pipeline.errors import UserError


class OutputDirError(UserError):
    """The output folder cannot take this run (not a folder, not writable, holding another run); the
    message says what to do."""


def check_not_a_file(path: Path) -> None:
    """OutputDirError when PATH is an existing file (checked before any work starts)."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} is a file, not a folder")


def make_output_dir(path: str | Path, for_file: Optional[Path] = None) -> Path:
    """PATH created as a folder, with its parents, in which a file can be created (checked before
    any work: an output written only at the end would otherwise fail after the whole run); an
    OutputDirError saying why otherwise, naming FOR_FILE when it is the file to be written there."""
    path = Path(path)
    check_not_a_file(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot make the output folder there ({exc.strerror or exc})") from None
    try:
        # a file of our own, deleted at once: what the folder holds is left as it is
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pipeline-", suffix=".check"):
            pass
    except OSError as exc:
        named = f"{for_file}: cannot write the output file there" if for_file else \
            f"{path}: cannot write files in the output folder"
        raise OutputDirError(f"{named} ({exc.strerror or exc})") from None
    return path


def check_output_file(path: str | Path, option: str = "--out", kind: str = ".onnx") -> Path:
    """PATH (given as OPTION, a KIND file) as a file that can be written, checked before any work
    (a model is written only after minutes of building or calibration): its folder is made, with
    its parents, and a file can be created there; an OutputDirError saying why otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder: {option} names the {kind} file to write")
    make_output_dir(path.parent, for_file=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputDirError(f"{path}: cannot write the output file there (it exists and is read-only)")
    return path


def claim_file(path: Path) -> Path:
    """The lock file of output folder PATH: in the machine's temp folder, named by PATH's absolute
    path, so that it can be taken before the folder exists (a run refused for bad input makes
    none) and leaves nothing in it."""
    absolute = os.path.abspath(path.resolve())
    digest = hashlib.sha1(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "int8-pipeline-outputs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.lock"


@contextlib.contextmanager
def exclusive_output(path: str | Path, command: str) -> Iterator[None]:
    """Hold an exclusive claim on output folder PATH for the length of the block, or raise
    OutputDirError naming the run that holds it. Two runs into one folder would interleave their
    files (one model's labels under another's manifest, an unreadable predictions.parquet).

    The claim is an flock, which the kernel releases when its process ends, however it ends; it
    guards runs whose drivers share this machine (and its temp folder)."""
    try:
        handle = os.open(claim_file(Path(path)), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot take the lock that keeps other runs out of it "
                             f"({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 4096, 0).decode(errors="replace").strip() or "another run"
            raise OutputDirError(f"{path} is the output of a run still going on ({holder}): wait for it "
                                 "to end, or give another output folder") from None
        os.ftruncate(handle, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.pwrite(handle, f"pipeline {command}, pid {os.getpid()} on {socket.gethostname()}, "
                          f"started {started}".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the flock


def temp_path(path: Path) -> Path:
    """The file PATH is written as until it is whole: in PATH's folder (a rename is atomic only
    within one file system), hidden (readers of the folder as a dataset, pyarrow, Ray and pandas,
    skip a name with a leading dot)."""
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(path: Path) -> None:
    """Make a rename in PATH durable."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def publish(temp: Path, path: Path) -> None:
    """Make the finished file TEMP the file PATH, durably: its bytes are on disk before the rename
    makes them PATH, so a reader never sees half a file, even after a crash."""
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, temp: Optional[Path] = None) -> Iterator[Path]:
    """The file the block writes (TEMP, or PATH's hidden temp file), made PATH once the block ends
    without error. A block that fails leaves the temp file as it is: it is never taken for PATH."""
    path = Path(path)
    temp = temp or temp_path(path)
    yield temp
    publish(temp, path)


def write_text(path: str | Path, text: str) -> None:
    """Write TEXT (UTF-8) to PATH whole or not at all."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: dict) -> None:
    """Write DATA to PATH as indented JSON, whole or not at all."""
    write_text(path, json.dumps(data, indent=2) + "\n")
