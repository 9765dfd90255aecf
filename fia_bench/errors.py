"""One exception type for bad input, so the CLI can print a single clear line instead of a trace."""

from __future__ import annotations

import difflib
import tempfile
import traceback
from collections.abc import Iterable
from pathlib import Path


class FiaBenchError(Exception):
    """Bad input or a broken invariant the user can fix; the message is one self-contained line."""


def unknown_choice(kind: str, name: str, choices: Iterable[str], where: str = "") -> FiaBenchError:
    """Build the standard 'unknown X' error naming the valid choices and the nearest match."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    place = f" in {where}" if where else ""
    return FiaBenchError(
        f"unknown {kind} '{name}'{place}; valid choices: {', '.join(options) or '(none)'}{hint}"
    )


def crash_line(err: BaseException, folder: Path | None) -> str:
    """An unexpected error as one line; its full trace goes to ``folder/error.log`` (or, with no
    folder or one that cannot be written, to a log file in the system temp folder) named in the
    line."""
    from fia_bench.cache import write_text

    trace = "".join(traceback.format_exception(err))
    try:
        if folder is None:
            raise OSError
        log = folder / "error.log"
        write_text(log, trace)
    except OSError:
        with tempfile.NamedTemporaryFile(
            "w", prefix="fia_bench-error-", suffix=".log", delete=False, encoding="utf-8"
        ) as f:
            f.write(trace)
            log = Path(f.name)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"internal error: {type(err).__name__}: {first} (full trace in {log})"
