"""Every `tunelab ...` command shown in the docs and the README parses against the real CLI; cheap read-only
ones (version, --help, run --dry-run on a shipped config) also run.

Commands are taken from ```console / ```bash / ```sh blocks: a leading `$ ` prompt is dropped, backslash
continuations are joined, `#` comments are ignored, and `a && b` lines give each command.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tests.cli_process import run_tunelab

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```(console|bash|sh|shell)\s*$")


def doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of each tunelab command in the file's shell blocks."""
    found, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_block = bool(BLOCK.match(line)) and not in_block
            pending = ""
            continue
        if not in_block:
            continue
        text = line.strip().removeprefix("$ ")
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        found += [(f"{path.relative_to(ROOT)}:{start}", argv) for argv in _simple_commands(text)
                  if argv and argv[0] == "tunelab"]
    return found


def _simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: `a && b | c; d` gives a, b, c and d."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


COMMANDS = [c for path in DOC_FILES for c in doc_commands(path)]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20
    assert len(CHEAP) >= 2
    runbooks = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
    assert len(runbooks) >= 5
    for path in runbooks:
        assert doc_commands(path), f"{path.name} shows no tunelab command"


def _parse(argv: list[str]) -> None:
    """Resolve the command path through the groups, then parse the leaf command's arguments and options as
    the real CLI would (types, required arguments, unknown options), without invoking it."""
    import typer

    from tunelab.cli import app

    command, parent, name, args = typer.main.get_command(app), None, "tunelab", argv[1:]
    while hasattr(command, "get_command"):
        ctx = command.make_context(name, [], parent=parent, resilient_parsing=True)
        if args[:1] == ["--help"]:
            return
        assert args, f"{ctx.command_path} needs a sub-command"
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"no command {args[0]!r} under {ctx.command_path!r}"
        command, parent, name, args = sub, ctx, args[0], args[1:]
    if "--help" in args:
        return
    leaf = command.make_context(name, list(args), parent=parent, resilient_parsing=False)
    assert not leaf.args, f"unexpected arguments {leaf.args}"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, argv):
    _parse(argv)


def _cheap(argv: list[str]) -> bool:
    if argv[1:] in (["version"], ["--help"]) or argv[-1] == "--help":
        return True
    return len(argv) >= 4 and argv[1] in ("run", "sweep") and "--dry-run" in argv and (ROOT / argv[2]).is_file()


CHEAP = [(w, a) for w, a in COMMANDS if _cheap(a)]


@pytest.mark.parametrize("where,argv", CHEAP, ids=[w for w, _ in CHEAP])
def test_cheap_doc_command_runs(where, argv):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = run_tunelab(*argv[1:], cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, f"{where}: {' '.join(argv)}\n{result.stderr[-2000:]}"


def test_a_wrong_command_or_option_fails_to_parse():
    with pytest.raises(AssertionError):
        _parse(["tunelab", "trian", "x.yaml"])
    with pytest.raises(Exception, match="No such option"):
        _parse(["tunelab", "train", "x.yaml", "--resum"])
    with pytest.raises(Exception, match="No such option"):
        _parse(["tunelab", "export", "gguf", "runs/x", "--quantize", "q4"])


def _all_command_paths() -> list[list[str]]:
    import typer

    from tunelab.cli import app

    found, todo = [], [([], typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            todo.append(([*path, name], sub))
    return found


def test_help_shows_no_value_type_on_flags():
    """A flag takes no value: help must not print `<bool>` beside it (typer does by default), and still names it."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    paths = _all_command_paths()
    assert ["chat"] in paths and ["runs", "compare"] in paths
    for path in paths:
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        assert "--help" in shown.output and "<bool>" not in shown.output, (path, shown.output)
    chat = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "200"}).output
    assert "--side-by-side" in chat and "<int>" in chat  # value-taking options keep their type
