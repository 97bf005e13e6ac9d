"""The table `run`, `train` and `eval` end with: every metric the suites computed, and the report's whole path."""

from __future__ import annotations

from rich.console import Console

from tunelab import cli_common
from tunelab.artifacts import RunPaths


def test_every_suite_metric_is_shown_and_the_report_path_is_never_cut(tmp_path, monkeypatch):
    root = tmp_path / ("a-run-folder-whose-path-is-longer-than-a-terminal-of-eighty-columns-" * 2).rstrip("-")
    report = RunPaths(root).eval / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    values = {"exact_match": 0.5, "token_f1": 0.625, "rouge_l": 0.75, "mean_words": 6.25}
    metrics = {"suites": {"test": {"n_examples": 8, "systems": {"base": values, "tuned": values}}}}
    console = Console(width=80, record=True)
    monkeypatch.setattr(cli_common, "out", console)
    cli_common.print_summary(root, None, metrics)
    text = console.export_text()
    for system in ("base", "tuned"):
        for metric, shown in (("exact_match", "50.0%"), ("token_f1", "62.5%"), ("rouge_l", "75.0%"),
                              ("mean_words", "6.25")):
            row = next(line for line in text.splitlines() if f"test {system} {metric} (n=8)" in line)
            assert shown in row
    assert f"report: {report}" in text.splitlines()
