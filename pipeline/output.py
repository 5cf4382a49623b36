"""Output folders: what `evaluate` and `label` share about the folder a run writes into."""

from __future__ import annotations

from pathlib import Path


class OutputDirError(ValueError):
    """The output folder cannot take this run (not a folder, not writable, holding another run); the
    message says what to do."""


def make_output_dir(path: str | Path) -> Path:
    """PATH created as a folder, with its parents; an OutputDirError saying why when it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{path} is a file, not a folder") from None
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot make the output folder there ({exc.strerror or exc})") from None
    return path
