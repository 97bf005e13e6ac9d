"""The base of every config section."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # extra="forbid": a misspelled key is an error with a did-you-mean, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def leaves(value: Any, key_path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) for every scalar in a config, raw or validated: a list's items share the list's path."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from leaves(getattr(value, name), (*key_path, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from leaves(item, key_path)
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from leaves(item, (*key_path, str(k)))
    else:
        yield key_path, value
