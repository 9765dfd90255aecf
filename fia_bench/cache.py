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
import tempfile
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
    so concurrent writers never see or clobber each other's partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class Cache:
    """Files under ``root/<stage>/<key[:2]>/<key><suffix>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, stage: str, key: str, suffix: str) -> Path:
        return self.root / stage / key[:2] / f"{key}{suffix}"

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
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
