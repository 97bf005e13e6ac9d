"""Every error class lives in tunelab/errors.py, so a reader finds them, and their messages' rules, in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import tunelab

PACKAGE = Path(tunelab.__file__).parent


def test_every_error_class_is_defined_in_errors_py():
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and (
                    node.name.endswith(("Error", "Exception")) or any(
                        (b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")).endswith(("Error", "Exception"))
                        for b in node.bases)):
                elsewhere.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert elsewhere == []
