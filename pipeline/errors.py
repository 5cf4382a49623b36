"""The base of every error that means "this input cannot be used": the commands report it in one
sentence, its message, never as a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A model, preset, input, output or option the pipeline cannot use; the message says why and,
    where it can, what to do."""


class UsageError(UserError):
    """An option value outside what the command takes (one the option parser cannot check)."""
