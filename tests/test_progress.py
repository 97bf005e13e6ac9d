"""Progress into a file (a cluster job's log, `make demo > log`): rich draws its bar there only when it stops, so
tunelab's bars also write a plain line now and then."""

from __future__ import annotations

import re

from tunelab.progress import progress_bar


def _run(bar, steps: int = 3) -> None:
    bar.start()
    task = bar.add_task("train", total=steps, info="")
    for step in range(1, steps + 1):
        bar.update(task, completed=step, info=f"loss {1 / step:.4f}  9 tok/s")
    bar.stop()


def test_lines_name_the_task_count_live_numbers_and_elapsed_time(capsys):
    _run(progress_bar(log_every=0))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train ") and "elapsed" in line]
    assert lines == [f"train {n}/3 loss {1 / n:.4f} 9 tok/s, 0:00:00 elapsed" for n in (1, 2, 3)]


def test_at_most_one_line_per_interval_and_none_when_disabled(capsys):
    _run(progress_bar(log_every=3600), steps=50)
    assert not re.search(r"elapsed$", capsys.readouterr().err, re.MULTILINE)  # only the bar, drawn at the end
    _run(progress_bar(disable=True, log_every=0))
    assert capsys.readouterr().err == ""
