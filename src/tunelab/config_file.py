"""Load a `RunConfig` from YAML plus `--set key.path=value` overrides, with errors people can act on.

Every problem is reported at once, one line each, naming the file, the YAML line, the key path, and
either the expected type or the closest valid key ("did you mean ...").
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.artifacts import RunPaths
from tunelab.config import RunConfig, unsafe_output_dir
from tunelab.config_guards import MAX_DEPTH, check_nesting, check_yaml_tree, read_config_text
from tunelab.config_paths import config_path_problems
from tunelab.config_section import leaves
from tunelab.errors import ConfigError, RunFolderError
from tunelab.redaction import redacted_config

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
    text = read_config_text(path)
    try:
        check_nesting(text, str(path))
        node = yaml.compose(text)
        check_yaml_tree(node, str(path))
        raw = yaml.safe_load(text)
        lines = _key_lines(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply (more than {MAX_DEPTH} levels)") from None
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
        keys = tuple(part.strip() for part in key.strip().split("."))
        if not all(keys):  # "train..epochs", ".epochs", "train."
            raise ConfigError(f"--set {key.strip()}: a key path has a name between each dot, e.g. train.epochs=2")
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
        except (ValueError, RecursionError):  # an integer too long to parse, runaway nesting
            raise ConfigError(f"--set {key.strip()}: the value cannot be read ({_short(value)})") from None
        touched.add(keys)
    return touched


def validate_config(
    raw: dict[str, Any],
    source: str = "<config>",
    lines: dict[tuple[str, ...], int] | None = None,
    overridden: set[tuple[str, ...]] | None = None,
) -> RunConfig:
    """Validate a raw mapping into a RunConfig, turning pydantic's errors into one line each."""
    lines, overridden = lines or {}, overridden or set()
    try:
        non_finite = _non_finite_problems(raw, source, lines, overridden)
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:  # every mistake at once, in file order; a nan named as such, not out of range
        raise ConfigError(*_describe(err, source, lines, overridden, also=non_finite)) from None
    except RecursionError:  # a self-referencing value built outside load_config
        raise ConfigError(f"{source}: a value refers to itself") from None
    if non_finite:
        raise ConfigError(*[message for _, message in sorted(non_finite.values(), key=lambda p: p[0])])
    _refuse_non_finite(cfg, source, lines, overridden)  # and what pydantic parsed from text ("inf" via --set)
    _refuse_secret_in_prompt(cfg, source, lines, overridden)
    if bad_paths := config_path_problems(cfg):
        raise ConfigError(*[f"{_where(source, lines, overridden, key_path)}: {'.'.join(key_path)}: {problem}"
                            for key_path, problem in bad_paths])
    return cfg


def _refuse_secret_in_prompt(cfg: RunConfig, source: str, lines: dict[tuple[str, ...], int],
                             overridden: set[tuple[str, ...]]) -> None:
    """The system prompt is stored with the run and the model is served with the stored text: one that holds a
    secret (a URL's credentials, the value of a variable an *_env key names) would be stored redacted, i.e.
    serve another prompt than the one trained, or stored in clear. Neither: it is refused."""
    from tunelab.redaction import env_secrets, redact

    prompt = cfg.data.system_prompt
    if prompt and redact(prompt, env_secrets(cfg.model_dump(mode="json")), "system_prompt") != prompt:
        where = _where(source, lines, overridden, ("data", "system_prompt"))
        raise ConfigError(f"{where}: data.system_prompt holds a secret (a URL's user:password@ or token parameter, "
                          "or the value of a variable an *_env key names); the prompt is trained into the model and "
                          "stored with the run: leave the secret out")


def _refuse_non_finite(value: Any, source: str, lines: dict[tuple[str, ...], int],
                       overridden: set[tuple[str, ...]]) -> None:
    problems = _non_finite_problems(value, source, lines, overridden)
    if problems:
        raise ConfigError(*[message for _, message in problems.values()])


def _non_finite_problems(value: Any, source: str, lines: dict[tuple[str, ...], int],
                         overridden: set[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[float, str]]:
    """key path -> (line, message) for each inf or nan in `value`."""
    return {key_path: (_line_of(lines, overridden, key_path),
                       f"{_where(source, lines, overridden, key_path)}: '{'.'.join(key_path)}' must be a finite "
                       f"number, got {number}") for key_path, number in _non_finite(value)}


def _line_of(lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]], key_path: tuple[str, ...]) -> float:
    """Where a problem sorts: its line, or after every line (a --set, a key the file does not hold)."""
    line = None if key_path in overridden else _nearest_line(lines, key_path)
    return line or float("inf")


def _non_finite(value: Any) -> list[tuple[tuple[str, ...], float]]:
    """Every float in the config that is inf or nan (YAML's .inf / .nan; a learning rate, epochs, a weight)."""
    return [(key_path, leaf) for key_path, leaf in leaves(value) if isinstance(leaf, float) and not math.isfinite(leaf)]


def _where(source: str, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]],
           key_path: tuple[str, ...]) -> str:
    if key_path in overridden:
        return f"{source} (--set {'.'.join(key_path)})"
    line = _nearest_line(lines, key_path)
    return f"{source}:{line}" if line else source


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error names a bad value, it never prints a huge one."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe(
    err: ValidationError, source: str, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]],
    also: dict[tuple[str, ...], tuple[float, str]] | None = None,
) -> list[str]:
    """One message per key, in file order. `also`: problems already found (a nan), which replace pydantic's
    message for their key."""
    seen: set[tuple[str, ...]] = set(also or {})
    problems: list[tuple[float, str]] = list((also or {}).values())  # (line, message): reported in file order
    for e in err.errors():
        key_path, owner, annotation = _walk(e["loc"])
        if key_path in seen:  # a union reports once per member; one line per key is enough
            continue
        seen.add(key_path)
        dotted = ".".join(key_path) or "(top level)"
        if e["type"] == "extra_forbidden":
            message = f"unknown key '{dotted}'" + _did_you_mean(key_path, owner)
        elif e["type"] == "missing":
            message = f"'{dotted}' is required but missing"
        elif e["type"] == "value_error":  # our own cross-field checks: their text already names the keys
            message = str(e.get("ctx", {}).get("error", e["msg"]))
        elif e["type"] in _TYPE_ERRORS and annotation is not None:
            message = f"'{dotted}' expects {render_type(annotation)}, got {_short(e['input'])}"
        else:
            message = f"'{dotted}': {e['msg'][0].lower()}{e['msg'][1:]}, got {_short(e.get('input'))}"
        where = _where(source, lines, overridden, key_path)
        problems.append((_line_of(lines, overridden, key_path), f"{where}: {message}"))
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
            items = get_args(annotation) if get_origin(annotation) is list else ()
            if isinstance(part, int) and len(items) == 1 and isinstance(items[0], type) \
                    and issubclass(items[0], BaseModel):
                annotation = items[0]  # an item of a list of sections, e.g. data.train[0]: its keys follow
            continue
        section = _optional_section(annotation)
        if section is not None:
            owner, annotation = section, None
        if annotation is not None:  # a union tag like 'list[str]' inside a known field
            continue
        path.append(part)
        field = owner.model_fields.get(part)
        if field is None:
            return tuple(path), owner, None
        annotation = field.annotation
    return tuple(path), owner, annotation


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds: `JudgeConfig` for `JudgeConfig` and for `JudgeConfig | None` (whose keys
    pydantic reports without a union tag), None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
            return members[0]
    return None


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
            out.setdefault(key, key_node.start_mark.line + 1)
            for sub, line in _key_lines(value_node, key).items():
                out.setdefault(sub, line)
    elif isinstance(node, yaml.SequenceNode):  # a list of sections (data.train): keys of its first items win
        for item in node.value:
            for sub, line in _key_lines(item, prefix).items():
                out.setdefault(sub, line)
    return out


def _nearest_line(lines: dict[tuple[str, ...], int], key_path: tuple[str, ...]) -> int | None:
    for n in range(len(key_path), 0, -1):
        if key_path[:n] in lines:
            return lines[key_path[:n]]
    return None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default written out, secrets redacted (tunelab.redaction)."""
    return yaml.safe_dump(redacted_config(cfg), sort_keys=False, allow_unicode=True)


def load_run_config(run_dir: Any, overrides: list[str] | None = None) -> tuple[RunConfig, RunPaths]:
    """The config a run folder was made with (plus `--set` overrides), for stages that take a run folder."""
    run = RunPaths(Path(run_dir))
    if not run.config.is_file():
        raise RunFolderError(f"{run.root}: not a run folder (no config.yaml)")
    return load_config(run.config, overrides, stored=True), run
