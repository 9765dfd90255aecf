"""The cache under concurrent writers: processes writing one key leave one whole file and no
temporary litter, readers never see a partial file, and work under a key's lock is never
interleaved."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import pytest

from fia_bench.cache import Cache, atomic_write, read_json, write_json

WRITERS = 4
ROUNDS = 30


def payload(writer: int) -> dict[str, object]:
    # large enough that a write takes several syscalls, so a torn file would be caught
    return {"writer": writer, "values": [writer] * 50_000}


def write_key(path: str, writer: int) -> None:
    for _ in range(ROUNDS):
        write_json(Path(path), payload(writer))


def read_key(path: str, torn: Synchronized) -> None:
    """Read until terminated, counting every read that is not one writer's whole payload."""
    while True:
        try:
            value = read_json(Path(path))
        except FileNotFoundError:
            continue
        except json.JSONDecodeError:
            torn.value += 1
            continue
        if value != payload(value["writer"]):
            torn.value += 1


def test_concurrent_writers_leave_one_whole_file_and_no_litter(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    path = Cache(tmp_path).path("scores", "ab" + "0" * 62, ".json")
    torn = ctx.Value("i", 0)
    reader = ctx.Process(target=read_key, args=(str(path), torn))
    writers = [ctx.Process(target=write_key, args=(str(path), w)) for w in range(WRITERS)]
    reader.start()
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    reader.terminate()
    reader.join()
    assert torn.value == 0
    assert list(path.parent.iterdir()) == [path]
    assert read_json(path) in [payload(w) for w in range(WRITERS)]


def add_under_lock(root: str, rounds: int) -> None:
    cache = Cache(root)
    counter = Path(root, "counter")
    for _ in range(rounds):
        with cache.lock("erase", "cd" + "1" * 62):
            value = int(counter.read_text())
            time.sleep(0.001)  # widen the read-modify-write window a lost update needs
            counter.write_text(str(value + 1))


def test_lock_serialises_read_modify_write_across_processes(tmp_path: Path) -> None:
    (tmp_path / "counter").write_text("0")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=add_under_lock, args=(str(tmp_path), ROUNDS)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "counter").read_text() == str(3 * ROUNDS)
    assert list((tmp_path / "erase").rglob("*.lock")) == []


def test_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"old": 1})

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"new":')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert read_json(path) == {"old": 1}
    assert list(tmp_path.iterdir()) == [path]
