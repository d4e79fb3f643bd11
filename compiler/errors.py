"""Errors presso raises. Each message names the problem and the way out."""
from __future__ import annotations


class PressoError(ValueError):
    """Base of every error presso raises on bad input or a failed step.

    ``hint`` says what to try; it is appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.problem = message
        self.hint = hint
        super().__init__(f"{message}\n  hint: {hint}" if hint else message)


class ConfigError(PressoError):
    """An unknown pass, an unknown option, or an option with a bad value."""


class TraceError(PressoError):
    """The model could not be run on the example inputs or could not be traced."""


class PassError(PressoError):
    """A pass failed, produced NaN/Inf, or drifted beyond its stated tolerance."""


class PluginError(PressoError):
    """A plugin is inconsistent with the others (for example a duplicate pass name)."""


class ExportError(PressoError):
    """Writing or loading an artifact failed."""
