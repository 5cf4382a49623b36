"""What every `pipeline` command shares to talk to the user: the stderr console, the progress bar,
the one-line failure for bad input, and the options that evaluate, label and quantize take alike
(imported by pipeline.cli and by the command modules it registers)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from ray.exceptions import RayError
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from pipeline.config import ConfigError, Preset, preset_names
from pipeline.errors import UserError
from pipeline.sources import FORMATS

console = Console(stderr=True)

PRESET_HELP = (f"preprocessing preset: a name in conf/ ({', '.join(preset_names())}) or a preset YAML file; "
               "default: the one the model carries in its metadata")

REAL_LABELS_HELP = ("ImageNet-ReaL labels file (JSON list of class-index lists, one per ILSVRC2012 validation image); "
                    "default: the packaged copy, used when the keys are ILSVRC2012_val_NNNNNNNN.JPEG names")

# the values --format takes: Typer lists them in the help and refuses any other before the command runs
InputFormat = Enum("InputFormat", {name: name for name in sorted(FORMATS)}, type=str)


def format_help(data_option: str) -> str:
    return f"input format: {', '.join(sorted(FORMATS))}; detected from {data_option} when omitted"


def format_name(value: Optional[InputFormat]) -> Optional[str]:
    return value.value if value else None


def say(message: str) -> None:
    """One line for the user on stderr, as written (a key or path may hold brackets) and never
    wrapped: it often ends in a path to copy."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


def interrupted(message: str) -> None:
    """A run ended by Ctrl-C: say what was left, and exit as an interrupted command does."""
    console.print(f"[bold yellow]interrupted:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(INTERRUPTED_EXIT)


RAY_DATA_ATTEMPTS = "Failed to apply UDF transform after"


def ray_failure_reason(exc: Exception) -> str:
    """What failed in a remote task or actor, on one line: the innermost exception of the remote
    traceback that Ray's error carries (`OSError: ...`), without its frames, Ray Data's wrapping
    UserCodeException and its advice on retries; the first line of an error without a traceback
    (a dead actor or node)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours the task's name
    innermost = text.split("The above exception was the direct cause of the following exception:")[0]
    lines = [line.rstrip() for line in innermost.splitlines() if line.strip()]
    if any(line.startswith('  File "') for line in lines):
        # the exception's own lines follow the traceback's last (indented) frame line, up to Ray
        # Data's account of its attempts where it added that to the message
        lines = lines[max((i + 1 for i, line in enumerate(lines) if line.startswith(" ")), default=0):]
        lines = lines[:next((i for i, line in enumerate(lines) if line.startswith(RAY_DATA_ATTEMPTS)), len(lines))]
        return " ".join(line.strip() for line in lines) or type(exc).__name__
    return lines[0] if lines else type(exc).__name__


def fail_in_ray(exc: Exception, after: str = "") -> None:
    """A run that Ray ended with an error (RayError): one line saying why, then AFTER, not Ray's traceback."""
    fail(f"the Ray pipeline failed: {ray_failure_reason(exc)}{after}")


@contextlib.contextmanager
def reported_failures(*, prefix: str = "", os_errors: bool = False, ray_advice: str = "",
                      interrupted_message: Optional[str] = None) -> Iterator[None]:
    """The body of a command, whose failures the user can act on end in one line and an exit status:
    a UserError, or a file gone between the checks and its reading (FileNotFoundError, whose message
    names it), as `error: PREFIX...`; with OS_ERRORS any OSError so (a model file that could not be
    written); a failure inside Ray as its reason, then RAY_ADVICE; Ctrl-C, when INTERRUPTED_MESSAGE
    says what the run left, as `interrupted: ...`."""
    reported = (UserError, OSError) if os_errors else (UserError, FileNotFoundError)
    try:
        yield
    except reported as exc:
        fail(f"{prefix}{exc}")
    except RayError as exc:
        fail_in_ray(exc, ray_advice)
    except KeyboardInterrupt:
        if interrupted_message is None:
            raise
        interrupted(interrupted_message)


def model_and_preset(model: Optional[Path], preset: Optional[str]) -> tuple[Path, str | Preset]:
    """The user's model and preset, or the default model with its own preset where none is given."""
    if model is None:
        from pipeline.models import default_model

        model, own_preset = default_model()
        say(f"no --model given: using {model}")
        return model, preset or own_preset
    return model, preset or preset_of_model(model)


def preset_of_model(model: Path) -> Preset:
    """The preset MODEL carries in its metadata; without one, a ConfigError naming the presets: a model
    preprocessed with a guessed preset gives a wrong accuracy that looks plausible."""
    from pipeline.model_preset import model_preset
    from pipeline.onnx_model import ModelInfo

    ModelInfo.from_path(model)  # a missing or non-ONNX file is reported as such
    own = model_preset(model)
    if own is None:
        raise ConfigError(f"{model} does not say how to preprocess its input (no preset in its metadata): give "
                          f"--preset, one of {', '.join(preset_names())} or a preset YAML file")
    return own


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    """A progress bar on stderr that stays after a finished run and is cleared when the run fails,
    so that the error line does not follow a bar stopped part-way."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=False)
    progress.start()
    try:
        yield progress
    except BaseException:
        # erased from a terminal and never printed to a file or pipe (Progress.stop would also add
        # a blank line there)
        progress.live.transient = True
        progress.live.stop()
        raise
    progress.stop()


class ProgressReporter:
    """on_progress callback that drives a rich progress bar. With START_ON_FIRST_CALL the bar appears
    at the first call and its rate leaves out that call's records (a resumed run first reports the
    work done before; a run that has nothing to do shows no bar)."""

    def __init__(self, progress: Progress, description: str, start_on_first_call: bool = False):
        self.clock = time.perf_counter
        self.progress = progress
        self.description = description
        self.task = None
        self.done_before = 0
        if not start_on_first_call:
            self._start(0)

    def _start(self, done: int) -> None:
        self.started = self.clock()
        self.done_before = done
        self.task = self.progress.add_task(self.description, total=None, completed=done, rate=0.0)

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.task is None:
            self._start(done)
        rate = (done - self.done_before) / max(self.clock() - self.started, 1e-9)
        self.progress.update(self.task, completed=done, total=total, rate=rate)
