"""User-facing failure families. ``cli.py`` maps each to a one-line message and an exit code.

Every message names the file (or URL) it is about and the problem, e.g.
``model.gguf: truncated tensor data (expected 98,362,432 bytes, found 4,096)``.
"""

from __future__ import annotations


class MixrunError(Exception):
    """Base of every error a user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class GGUFError(MixrunError):
    """A model file that is missing, not GGUF, malformed, or not what mixrun can use."""


class ProfileError(MixrunError):
    """A rig profile that is missing, not TOML, or fails validation."""


class RuntimeFailure(MixrunError):
    """A failure while running a model (not the user's input): exit code 1."""

    exit_code = 1


def where(path: object, problem: str) -> str:
    """The canonical ``FILE: problem`` message."""
    return f"{path}: {problem}"


def read_problem(e: OSError, what: str) -> str:
    """The problem, in words, of an OSError raised reading a file that should be ``what`` ("a GGUF file")."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return f"is a directory, not {what}"
    return f"cannot read ({e.strerror})"
