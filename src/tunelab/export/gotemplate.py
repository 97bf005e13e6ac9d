"""A small interpreter for the subset of Go's text/template that Ollama chat templates use.

tunelab checks a Modelfile's TEMPLATE by behaviour: it renders probe conversations with the Go template
itself (here) and with the run's Jinja template, and writes the Modelfile only when they agree. Supported:
`{{ .Field }}`, `{{ $.Field }}`, `{{ $var }}`, `$v := expr`, `$v = expr`, `range $i, $_ := pipeline`,
`if / else if / else / end`, string literals, parentheses, and the functions eq, ne, and, or, not, len,
slice, index; the constants true, false, nil; `{{-` and `-}}` trim the adjacent whitespace as in Go.
Anything else raises GoTemplateError.
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.errors import GoTemplateError

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\$?\.?[A-Za-z_][\w.]*|\$\.[\w.]*|\$|-?\d+|:=|=)')


def render_go(template: str, data: dict[str, Any]) -> str:
    nodes, rest = _parse(_lex(template), 0, ())
    if rest != len(_lex(template)):
        raise GoTemplateError("unexpected {{ end }} or {{ else }}")
    out: list[str] = []
    _exec(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's trim markers applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if items and items[-1][0] == "trim":
            items.pop()
            text = text.lstrip()
        items.append(("text", text))
        items.append(("action", m.group(2)))
        if m.group(3):
            items.append(("trim", ""))
        pos = m.end()
    text = template[pos:]
    if items and items[-1][0] == "trim":
        items.pop()
        text = text.lstrip()
    items.append(("text", text))
    return items


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(maxsplit=1)[0] if body else ""
        if word in ("end", "else") and word in stop:
            return nodes, i
        if word in ("end", "else"):
            raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
        if word == "if":
            branches, i = _parse_if(items, i)
            nodes.append(("if", branches))
        elif word == "range":
            m = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w*)\s*:=\s*(.+)", body, re.S)
            if not m:
                raise GoTemplateError(f"unsupported range: {body}")
            inner, i = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), _tokens(m.group(3)), inner))
            i += 1
        elif re.match(r"\$\w+\s*:?=", body):
            name, _, expr = re.split(r"\s*(:?=)\s*", body, maxsplit=1)
            nodes.append(("set", name, _tokens(expr)))
            i += 1
        elif body.startswith("/*"):
            i += 1
        else:
            nodes.append(("print", _tokens(body)))
            i += 1
    if stop:
        raise GoTemplateError("missing {{ end }}")
    return nodes, i


def _parse_if(items: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    branches = []
    cond: list[str] | None = _tokens(items[i][1][2:])
    while True:
        body, i = _parse(items, i + 1, ("end", "else"))
        branches.append((cond, body))
        action = items[i][1]
        if action == "end":
            return branches, i + 1
        rest = action[4:].strip()
        cond = _tokens(rest[2:]) if rest.startswith("if") else None
        if cond is None and rest:
            raise GoTemplateError(f"unsupported else: {action}")


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip():
                raise GoTemplateError(f"cannot parse: {expr!r}")
            break
        out.append(m.group(1))
        pos = m.end()
    return out


def _exec(nodes: list[Any], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_eval(cond, dot, scope)):
                    _exec(body, dot, scope, out)
                    break
        elif kind == "range":
            _, index_var, value_var, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scope) or []):
                scope[index_var] = i
                if value_var and value_var != "$_":
                    scope[value_var] = item
                _exec(body, item, scope, out)


def _truthy(value: Any) -> bool:
    return bool(value)


_CONSTANTS = {"true": True, "false": False, "nil": None}
_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "and": lambda *xs: next((x for x in xs if not _truthy(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truthy(x)), xs[-1]),
    "len": len, "index": lambda x, i: x[i], "slice": lambda x, i, j=None: x[i:j],
}


def _eval(tokens: list[str], dot: Any, scope: dict[str, Any]) -> Any:
    args, _ = _eval_seq(tokens, 0, dot, scope)
    if not args:
        raise GoTemplateError("empty expression")
    return args[0] if len(args) == 1 else _call(args)


def _call(args: list[Any]) -> Any:
    fn = args[0]
    if not callable(fn):
        raise GoTemplateError(f"{fn!r} is not a function")
    return fn(*args[1:])


def _eval_seq(tokens: list[str], i: int, dot: Any, scope: dict[str, Any]) -> tuple[list[Any], int]:
    values: list[Any] = []
    while i < len(tokens):
        tok = tokens[i]
        if tok == ")":
            return values, i
        if tok == "(":
            inner, i = _eval_seq(tokens, i + 1, dot, scope)
            values.append(inner[0] if len(inner) == 1 else _call(inner))
        elif tok.startswith('"'):
            values.append(bytes(tok[1:-1], "utf-8").decode("unicode_escape"))
        elif tok in _CONSTANTS:
            values.append(_CONSTANTS[tok])
        elif tok in _FUNCS:
            values.append(_FUNCS[tok])
        elif re.fullmatch(r"-?\d+", tok):
            values.append(int(tok))
        else:
            values.append(_lookup(tok, dot, scope))
        i += 1
    return values, i


def _lookup(tok: str, dot: Any, scope: dict[str, Any]) -> Any:
    if tok.startswith("$"):
        head, _, path = tok.partition(".")
        if head not in scope:
            raise GoTemplateError(f"undefined variable {head}")
        value = scope[head]
    elif tok.startswith("."):
        value, path = dot, tok[1:]
    else:
        raise GoTemplateError(f"unknown function or value {tok!r}")
    for part in filter(None, path.split(".")):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value
