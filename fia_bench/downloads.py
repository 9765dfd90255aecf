"""Public data files (I2P, COCO-30k captions) fetched once into the cache, or read from a path,
and the CSV tables users hand in (these, attack prompt and pair files) read with their columns
checked.

Offline, a file that is not cached fails with one line saying where to get it and how to pass it,
never with a trace from deep inside an HTTP library; a table that cannot serve fails with one
line naming the file and what it lacks, never with a trace from inside pandas."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from fia_bench.cache import Cache, atomic_write, stable_hash
from fia_bench.errors import FiaBenchError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    name: str, path: str | None, url: str | None, sha256: str | None, cache: Cache, setting: str
) -> Path:
    """A local copy of a data file: ``path`` if given, else the cached download of ``url``.

    ``sha256``, when given, is checked on every use; ``setting`` names the config key a user sets
    to point at a file of their own.
    """
    if path:
        local = Path(path).expanduser()
        if not local.is_file():
            raise FiaBenchError(f"{name}: {local} does not exist ({setting})")
    else:
        if not url:
            raise FiaBenchError(f"{name}: give a local file with {setting}=/path")
        local = cache.path("downloads", stable_hash(url), f"-{Path(url).name}")
        if not local.exists():
            download(name, url, local, setting)
    if sha256 and sha256_of(local) != sha256:
        raise FiaBenchError(
            f"{name}: {local} has sha256 {sha256_of(local)[:12]}…, expected "
            f"{sha256[:12]}…; delete it or fix the expected checksum"
        )
    return local


def download(name: str, url: str, target: Path, setting: str) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FIA_BENCH_OFFLINE") == "1"
    hint = f"download {url} yourself and pass {setting}=/path/to/file"
    if offline:
        raise FiaBenchError(f"{name} is not cached and this run is offline: {hint}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise FiaBenchError(f"{name}: cannot download ({err}); {hint}") from err
    atomic_write(target, lambda tmp: tmp.write_bytes(data))


def read_table(path: Path, columns: Iterable[str]) -> pd.DataFrame:
    """A UTF-8 CSV with at least ``columns``; empty cells stay empty strings."""
    try:
        frame = pd.read_csv(path, encoding="utf-8", keep_default_na=False)
    except UnicodeDecodeError as err:
        raise FiaBenchError(f"{path}: not UTF-8 ({err.reason}); save the file as UTF-8") from err
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise FiaBenchError(f"{path}: not a CSV table ({str(err).strip()})") from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise FiaBenchError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"
        )
    return frame
