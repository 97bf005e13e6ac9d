"""Paths in a config that no file system can open, found before any stage touches them.

A path with a NUL byte, a name longer than file systems allow (255 bytes) or a file where a folder must be
(`output.dir: notes.txt/run`) would otherwise surface as an OSError from whichever stage opens it first, as a
traceback, and possibly after the run folder was written. Checked on every Path the validated config holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunelab.config_section import leaves

NAME_MAX = 255  # bytes in one path component on ext4, xfs, btrfs, APFS, NTFS (UTF-16 units there)


def config_path_problems(cfg: Any) -> list[tuple[tuple[str, ...], str]]:
    """(key path, what is wrong) for each unusable path of a validated RunConfig, the sqlite file of
    track.tracking_uri included (MLflow would create its folder, after the run folder was written)."""
    problems = path_problems(cfg)
    uri = cfg.track.tracking_uri or ""
    if uri.startswith("sqlite:///") and (problem := path_problem(Path(uri[len("sqlite:///"):]))):
        problems.append((("track", "tracking_uri"), problem))
    return problems


def path_problems(value: Any) -> list[tuple[tuple[str, ...], str]]:
    """(key path, what is wrong) for each unusable path in `value`, a validated config or part of one."""
    return [(key_path, problem) for key_path, leaf in leaves(value)
            if isinstance(leaf, Path) and (problem := path_problem(leaf))]


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be a file or folder on this machine, or None."""
    text = str(path)
    if "\x00" in text:
        return "the path holds a NUL byte"
    for part in path.parts:
        try:
            size = len(os.fsencode(part))
        except UnicodeError:  # a lone surrogate: no file system can hold that name either
            return f"the name '{part[:40]}' is not valid text"
        if size > NAME_MAX:
            return f"the name '{part[:40]}...' is {size} bytes long; file systems allow {NAME_MAX}"
    try:
        path.expanduser().stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # to be written, or a file on the way: below
    except OSError as err:  # a loop of links; a path too long in all
        return err.strerror or str(err)
    for ancestor in path.expanduser().parents:
        try:
            if ancestor.is_dir():
                return None
            if ancestor.exists():
                return f"{ancestor} is a file, not a folder"
        except OSError as err:  # a path too long in all, a loop of links
            return f"{ancestor}: {err.strerror or err}"
    return None
