"""One exception type for bad input, so the CLI can print a single clear line instead of a trace."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
