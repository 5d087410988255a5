"""The error types every part of quintet raises for bad input, one per kind of input.

Each message names the file (and line or field), the value found and what would be valid; the CLI prints
it as one line and exits with code 2 (`quintet.cli`). Subclasses of ValueError, so library callers that
catch ValueError keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration (a TOML/YAML file, a config.json, a config dataclass) holds a value that cannot be
    used: the message names the file:line or the field, the value and the valid values."""


class CheckpointError(ValueError):
    """A model folder or a training checkpoint is missing, corrupt or does not match its config."""


class OutputInUseError(ValueError):
    """An output folder is locked by another running process (the message names its PID), or holds a
    previous run that the command would silently overwrite or extend."""
