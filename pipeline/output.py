"""Output folders: what `evaluate` and `label` share about the folder a run writes into."""

from __future__ import annotations

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
