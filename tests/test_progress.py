"""Progress on a terminal is tqdm's bar; in a log file it is plain lines, a few of them."""

from __future__ import annotations

import io

import pytest

from fia_bench import progress as progress_module
from fia_bench.progress import PLAIN_EVERY, PlainProgress, progress


def test_a_log_file_gets_plain_periodic_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    now = [0.0]
    seen = []
    bar = progress(range(10), desc="jobs", unit="job", clock=lambda: now[0])
    assert isinstance(bar, PlainProgress)
    for i in bar:
        seen.append(i)
        now[0] += PLAIN_EVERY / 4  # a line every fourth step at most
        bar.set_postfix(loss=f"{i:.1f}")
    assert seen == list(range(10))
    lines = log.getvalue().splitlines()
    assert lines == [
        "[fia_bench] jobs: 4/10 job (30 s, loss=3.0)",
        "[fia_bench] jobs: 8/10 job (60 s, loss=7.0)",
        "[fia_bench] jobs: 10/10 job (75 s, loss=9.0)",  # the kept bar's last line
    ]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    # an inner bar (leave=False) of a quick loop writes nothing at all
    log.truncate(0)
    with progress(total=3, desc="inner", leave=False, clock=lambda: 0.0) as inner:
        inner.update(3)
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress_module, "watched", lambda: True)
    bar = progress(range(2), desc="jobs", disable=True)
    assert isinstance(bar, tqdm)
