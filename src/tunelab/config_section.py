"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # extra="forbid": a misspelled key is an error with a did-you-mean, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
