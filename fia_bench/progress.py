"""Progress bars on a terminal, plain lines in a log file.

tqdm redraws its bar with carriage returns and escape codes, which a redirected stderr (a log
file, CI, ``nohup``) keeps as one unreadable line per refresh. ``progress`` is tqdm where someone
watches (a terminal or a notebook) and otherwise prints a plain line at most every
``PLAIN_EVERY`` seconds, plus a last one when a kept (``leave=True``) bar finishes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PLAIN_EVERY = 30.0  # seconds between two plain progress lines of one loop


def watched() -> bool:
    """Whether stderr is a terminal or a notebook: where a redrawn bar is readable."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class PlainProgress:
    """The part of tqdm's interface the harness and its plugins use, written as plain lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        leave: bool = True,
        disable: bool = False,
        clock: Any = time.monotonic,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        self.desc, self.unit, self.leave, self.disable = desc, unit, leave, disable
        self.total = total if total is not None else getattr(iterable, "__len__", lambda: None)()
        self.n = 0
        self.postfix = ""
        self.clock = clock
        self.started = self.last = clock()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= PLAIN_EVERY:
            self.emit()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.leave and self.n:
            self.emit()
        self.leave = False  # a second close (iteration ended inside a with block) is silent

    def emit(self) -> None:
        self.last = self.clock()
        if self.disable:
            return
        of = f"/{self.total}" if self.total is not None else ""
        more = f", {self.postfix}" if self.postfix else ""
        elapsed = self.last - self.started
        print(
            f"[fia_bench] {self.desc}: {self.n}{of} {self.unit} ({elapsed:.0f} s{more})",
            file=sys.stderr,
            flush=True,
        )


def progress(iterable: Iterable[Any] | None = None, **options: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **options)`` where it is watched, else ``PlainProgress``."""
    if watched():
        from tqdm.auto import tqdm

        return tqdm(iterable, **options)
    return PlainProgress(iterable, **options)
