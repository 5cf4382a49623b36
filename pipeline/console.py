"""What every `pipeline` command shares to talk to the user: the stderr console and the one-line
failure for bad input (imported by pipeline.cli and by the command modules it registers)."""

from __future__ import annotations

import typer
from rich.console import Console

from pipeline.config import ConfigError
from pipeline.inference import ModelError
from pipeline.sources import SourceError

console = Console(stderr=True)

# errors that mean "this input cannot be used": reported in one sentence, never as a traceback
USER_ERRORS = (ConfigError, ModelError, SourceError, FileNotFoundError)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
