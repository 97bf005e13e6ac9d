"""User-facing errors.

A `TunelabError` is a mistake the user can fix (bad config, bad data row, missing file). The CLI prints
its message as one line per problem and exits non-zero, never with a traceback. Anything else that
escapes is a bug in tunelab and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem in the user's input, described so they can fix it.

    `problems` holds one line per problem, so config validation can report every mistake at once.
    """

    exit_code = 2

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(TunelabError):
    """The YAML config or a --set override is invalid."""


class DataError(TunelabError):
    """A data file or one of its rows is invalid."""


class ModelError(TunelabError):
    """The model cannot be resolved or loaded."""


class RunFolderError(TunelabError):
    """A run folder is missing, incomplete, or would be overwritten."""
