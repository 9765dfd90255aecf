"""Content-addressed storage for every stage's artifacts.

A key is the sha256 of everything that determines an artifact, so an identical request always
finds its earlier result and a changed input can never be served a stale one. Writes go to a
temporary file renamed into place: a killed run leaves either a whole file or none, and
concurrent writers of one key (ranks of a sharded run, jobs of a parallel sweep) each rename a
whole file of their own. A stage whose output is several files, or too costly to compute twice,
computes it under the key's lock (``Cache.lock``), so the files of one key always come from one
writer and a second process waits for the first instead of repeating its work."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in the order given."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place. The
    temporary name is unique per call (pid + random) and renames within one directory are atomic,
    so concurrent writers never see or clobber each other's partial files. The file is created
    with mode 0666 less the user's umask, like any other file of theirs (``mkstemp``'s 0600 would
    make a cache shared by a group unreadable to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class Damaged(Exception):
    """A cache entry that cannot be what its key or recorded digest says it is."""


SEALED = ("sha256", "content")


def write_sealed_json(path: Path, obj: Any) -> None:
    """JSON stored beside the sha256 of its content, so a changed byte is caught on reading."""
    content = json.loads(json.dumps(obj, default=str))
    write_json(path, {SEALED[0]: stable_hash(content), SEALED[1]: content})


def read_sealed_json(path: Path) -> Any:
    """The content of a sealed JSON file; ``Damaged`` when it does not parse or its digest does
    not match. Entries written before sealing (plain JSON) are returned as they are."""
    try:
        stored = read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Damaged(f"not JSON ({err})") from err
    if not (isinstance(stored, dict) and set(stored) == set(SEALED)):
        return stored
    if stable_hash(stored["content"]) != stored["sha256"]:
        raise Damaged("content does not match its recorded sha256")
    return stored["content"]


def check_png(path: Path) -> None:
    """``Damaged`` unless the file is a whole PNG whose every chunk matches its checksum."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for damaged files
        raise Damaged(f"not a whole PNG ({type(err).__name__}: {err})") from err


class Cache:
    """Files under ``root/<stage>/<key[:2]>/<key><suffix>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, stage: str, key: str, suffix: str) -> Path:
        return self.root / stage / key[:2] / f"{key}{suffix}"

    def set_aside(self, paths: Iterable[Path], reason: str) -> None:
        """Move a damaged entry's files to ``root/damaged/`` (kept for inspection, never read
        again) and say so in one line; the caller then recomputes the entry."""
        moved = []
        for path in paths:
            if not path.exists():
                continue
            target = self.root / "damaged" / path.relative_to(self.root)
            target = target.with_name(f"{target.name}.{time.strftime('%Y%m%dT%H%M%S')}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(path, target)
                moved.append(path.relative_to(self.root).as_posix())
        if moved:
            print(
                f"[fia_bench] damaged cache entry {', '.join(moved)} ({reason}): moved to "
                f"{self.root / 'damaged'}, recomputing",
                file=sys.stderr,
            )

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the key's exclusive lock (``flock`` on ``<key>.lock``) across processes; on a
        shared file system every machine must mount it with flock support (NFSv4 does, Lustre
        needs ``-o flock``). Locks are leaves or nest erase/attack → score → images, never the
        other way, so processes cannot deadlock. The lock file is removed on release; a waiter
        that wakes on a removed file takes the lock again on the current one."""
        path = self.path(stage, key, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as any file
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            path.unlink()
            os.close(fd)
