"""Every error class tunelab raises, in one place.

A `TunelabError` is a mistake the user can fix (bad config, bad data row, missing file). The CLI prints
its message as one line per problem and exits non-zero, never with a traceback. So does an OSError that names
a file (the file system refusing a path the user gave: permissions, a full disk). Anything else that escapes is
a bug in tunelab and keeps its traceback.

`RowError` and `GoTemplateError` are signals inside a stage, not messages for the user: the stage that catches
them (a row loader skipping or reporting a bad row, the Modelfile writer trying the next template variant)
turns them into a `TunelabError` or a report line.
"""

from __future__ import annotations

from typing import Any


def cut(text: str, limit: int = 80) -> str:
    """`text` as an error message quotes it: a name a client or file sent may be megabytes long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


class NoTrainingRows(DataError):
    """Every training row was filtered out; carries the report that says by which filters."""

    def __init__(self, problem: str, report: dict[str, Any]) -> None:
        super().__init__(problem)
        self.report = report


class ModelError(TunelabError):
    """The model cannot be resolved or loaded."""


class RunFolderError(TunelabError):
    """A run folder is missing, incomplete, or would be overwritten."""


class TrainingError(TunelabError):
    """Training had to stop for a reason the user can act on."""


class TrackingError(TunelabError):
    """The MLflow store cannot be reached or used, or does not hold the model, version or alias asked for."""


class ExportError(TunelabError):
    """An export could not be produced or failed its verification."""


class TemplateError(TunelabError):
    """The chat template cannot be expressed as an Ollama template."""


class LlamaCppError(TunelabError):
    """llama.cpp's tools are missing or failed."""


class ServeError(TunelabError):
    """A serving request or set-up that cannot be honoured; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RowError(ValueError):
    """A single row is invalid; `field` names where (e.g. 'messages[2].role')."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")


class NonTextPart(ValueError):
    """An OpenAI content part that is not text, at `index`: `shown` names it ("a image_url part")."""

    def __init__(self, index: int, shown: str) -> None:
        super().__init__(f"part {index} is {shown}")
        self.index, self.shown = index, shown


class GoTemplateError(ValueError):
    """A Go template uses something export/gotemplate.py does not interpret."""


class NotData(ValueError):
    """JSON that parses but cannot be meant as data (a key given twice, NaN): the message is the problem."""
