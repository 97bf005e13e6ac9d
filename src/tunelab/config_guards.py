"""Guards a config file passes before it is parsed into values: its encoding, and the bounds that stop hostile or
broken YAML (alias bombs, runaway nesting, numbers Python refuses to parse) before they cost minutes or memory.
Each failure is one ConfigError line naming the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunelab.errors import ConfigError

# A config is a few hundred values at most: far below these bounds.
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_INT_DIGITS = 4300  # Python's own int-from-string limit (sys.get_int_max_str_digits)
_INT_TAG = "tag:yaml.org,2002:int"


def read_config_text(path: Path) -> str:
    """The config's text: UTF-8, with or without a byte-order mark; anything else is a one-line error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {err.start}); re-save the config as UTF-8") from None


def check_nesting(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before composing: PyYAML's composer recurses per level, so a file of
    thousands of '[' would end in a RecursionError. The event parser does not recurse."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}:{event.start_mark.line + 1}: a value is nested more than {MAX_DEPTH} "
                                  "levels deep; a config is a few levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def check_yaml_tree(node: yaml.Node | None, source: str) -> None:
    """Refuse, one line each and before anything is built, what YAML allows but a config must not be: keys
    given twice (YAML keeps the last silently), recursive aliases, aliases that expand to more than
    MAX_VALUES values (a "billion laughs"), nesting deeper than MAX_DEPTH, integers too long to parse."""
    problems: list[tuple[int, str]] = []
    sizes: dict[int, int] = {}

    def at(n: yaml.Node) -> int:
        return n.start_mark.line + 1

    def walk(n: yaml.Node, keys: tuple[str, ...], stack: set[int]) -> int:
        if id(n) in stack:
            raise ConfigError(f"{source}:{at(n)}: '{'.'.join(keys) or '(top level)'}' refers to itself through a "
                              "YAML alias (&anchor ... *anchor inside itself)")
        if len(stack) >= MAX_DEPTH:
            raise ConfigError(f"{source}:{at(n)}: '{'.'.join(keys)}' is nested more than {MAX_DEPTH} levels deep")
        if id(n) in sizes:  # an alias: counted again, as it expands again when built
            return sizes[id(n)]
        size = 1
        stack.add(id(n))
        if isinstance(n, yaml.ScalarNode):
            if n.tag == _INT_TAG and sum(c.isdigit() for c in str(n.value)) > MAX_INT_DIGITS:
                problems.append((at(n), f"{source}:{at(n)}: '{'.'.join(keys)}' is an integer of "
                                 f"{len(str(n.value))} digits; the most a config takes is {MAX_INT_DIGITS}"))
        elif isinstance(n, yaml.SequenceNode):
            size += sum(walk(item, keys, stack) for item in n.value)
        elif isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in n.value:
                key = str(key_node.value)
                if id(value_node) in stack:  # name the key whose alias points back into itself
                    raise ConfigError(f"{source}:{at(key_node)}: '{'.'.join((*keys, key))}' refers to itself "
                                      "through a YAML alias (&anchor ... *anchor inside itself)")
                if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                    if key in first:
                        dotted = ".".join((*keys, key))
                        problems.append((at(key_node), f"{source}:{at(key_node)}: duplicate key '{dotted}' (first "
                                         f"at line {first[key]}); YAML would keep only the last, remove one"))
                    else:
                        first[key] = at(key_node)
                size += walk(key_node, keys, stack) + walk(value_node, (*keys, key), stack)
        stack.discard(id(n))
        sizes[id(n)] = size
        if size > MAX_VALUES:
            raise ConfigError(f"{source}:{at(n)}: '{'.'.join(keys) or '(top level)'}' expands to more than "
                              f"{MAX_VALUES} values through YAML aliases; a config is far smaller (an alias bomb?)")
        return size

    if node is not None:
        walk(node, (), set())
    if problems:
        raise ConfigError(*[message for _, message in sorted(problems)])
