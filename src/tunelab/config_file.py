"""Load a `RunConfig` from YAML plus `--set key.path=value` overrides, with errors people can act on.

Every problem is reported at once, one line each, naming the file, the YAML line, the key path, and
either the expected type or the closest valid key ("did you mean ...").
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config import RunConfig, unsafe_output_dir
from tunelab.errors import ConfigError

# Pydantic error types that mean "the value has the wrong type" (as opposed to a failed constraint).
_TYPE_ERRORS = {
    "int_parsing", "int_type", "int_from_float", "float_parsing", "float_type", "bool_parsing",
    "bool_type", "string_type", "literal_error", "list_type", "dict_type", "model_type",
    "model_attributes_type", "path_type", "is_instance_of", "none_required", "enum",
}


def load_config(path: str | Path, overrides: list[str] | None = None, stored: bool = False) -> RunConfig:
    """Read YAML at `path`, apply `overrides` ("a.b=value"), validate, and return the config.

    `stored`: the config.yaml of a run folder, whose output.dir is that folder (so it holds the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, data:, ...)")
    overridden = apply_overrides(raw, overrides or [])
    cfg = validate_config(raw, source=str(path), lines=lines, overridden=overridden)
    where = None if stored else unsafe_output_dir(cfg.output.dir, path)
    if where:
        line = _nearest_line(lines, ("output", "dir"))
        at = f"{path} (--set output.dir)" if ("output", "dir") in overridden else f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{at}: output.dir: {cfg.output.dir} is {where}; a run needs a folder of its own, "
                          "e.g. runs/NAME")
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each "a.b.c=value" into `raw` (value parsed as YAML); return the key paths touched."""
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.learning_rate=1e-4")
        keys = tuple(key.strip().split("."))
        node = raw
        for part in keys[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            node[keys[-1]] = value
        touched.add(keys)
    return touched


def validate_config(
    raw: dict[str, Any],
    source: str = "<config>",
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] | None = None,
) -> RunConfig:
    """Validate a raw mapping into a RunConfig, turning pydantic's errors into one line each."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = _describe(err, source, lines or {}, overridden or set())
        raise ConfigError(*problems) from None


def _describe(
    err: ValidationError, source: str, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]
) -> list[str]:
    seen: set[tuple[str, ...]] = set()
    problems: list[tuple[float, str]] = []  # (line, message): reported in file order
    for e in err.errors():
        key_path, owner, annotation = _walk(e["loc"])
        if key_path in seen:  # a union reports once per member; one line per key is enough
            continue
        seen.add(key_path)
        dotted = ".".join(key_path) or "(top level)"
        line = None if key_path in overridden else _nearest_line(lines, key_path)
        if key_path in overridden:
            where = f"{source} (--set {dotted})"
        else:
            where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            message = f"unknown key '{dotted}'" + _did_you_mean(key_path, owner)
        elif e["type"] == "missing":
            message = f"'{dotted}' is required but missing"
        elif e["type"] == "value_error":  # our own cross-field checks: their text already names the keys
            message = str(e.get("ctx", {}).get("error", e["msg"]))
        elif e["type"] in _TYPE_ERRORS and annotation is not None:
            message = f"'{dotted}' expects {render_type(annotation)}, got {e['input']!r}"
        else:
            message = f"'{dotted}': {e['msg'][0].lower()}{e['msg'][1:]}, got {e.get('input')!r}"
        problems.append((line or float("inf"), f"{where}: {message}"))
    return [message for _, message in sorted(problems, key=lambda p: p[0])]


def _walk(loc: tuple[Any, ...]) -> tuple[tuple[str, ...], type[BaseModel], Any]:
    """Follow an error location through the config models.

    Returns the key path (only real keys; pydantic's union tags and list indexes are dropped), the
    model that owns the last key, and that key's type annotation (None if the key is unknown).
    """
    owner: type[BaseModel] = RunConfig
    path: list[str] = []
    annotation: Any = None
    for part in loc:
        if not isinstance(part, str):
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            owner, annotation = annotation, None
        if annotation is not None:  # a union tag like 'list[str]' inside a known field
            continue
        path.append(part)
        field = owner.model_fields.get(part)
        if field is None:
            return tuple(path), owner, None
        annotation = field.annotation
    return tuple(path), owner, annotation


def _did_you_mean(key_path: tuple[str, ...], owner: type[BaseModel]) -> str:
    key = key_path[-1]
    close = difflib.get_close_matches(key, list(owner.model_fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{'.'.join((*key_path[:-1], close[0]))}'?"
    # The right key in the wrong section, e.g. a top-level learning_rate.
    elsewhere = [p for p in all_key_paths() if p[-1] == key]
    if elsewhere:
        return f"; did you mean '{'.'.join(elsewhere[0])}'?"
    return f"; valid keys here: {', '.join(owner.model_fields)}"


def all_key_paths(model: type[BaseModel] = RunConfig, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key path of the config schema, e.g. ('train', 'learning_rate')."""
    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(all_key_paths(ann, (*prefix, name)))
        else:
            paths.append((*prefix, name))
    return paths


def render_type(annotation: Any) -> str:
    """Say in words what a field accepts: 'a number', 'one of: cosine, linear', 'a list of paths'."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if len(choices) == 1:
            return repr(choices[0])
        return "one of: " + ", ".join(str(a) for a in choices)
    if origin in (typing.Union, types.UnionType):
        parts = [render_type(a) for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(parts)
        return text + " (or null)" if type(None) in get_args(annotation) else text
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return f"a list of {_plural(render_type(item))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of keys"
    return str(annotation)


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path in a composed YAML document to its 1-based line number."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key))
    return out


def _nearest_line(lines: dict[tuple[str, ...], int], key_path: tuple[str, ...]) -> int | None:
    for n in range(len(key_path), 0, -1):
        if key_path[:n] in lines:
            return lines[key_path[:n]]
    return None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default written out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
