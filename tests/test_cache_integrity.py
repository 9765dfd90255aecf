"""The cache verifies what it reads: every kind of artifact, truncated, garbled or with one bit
flipped, is named, moved aside and recomputed, and the run's tables come out as before. Also the
files it writes get the user's umask, and clean-fid's Inception file is checked before loading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import fia_bench
from fia_bench.cache import Damaged, atomic_write, read_sealed_json, write_sealed_json
from fia_bench.errors import FiaBenchError

JOB = [
    "method=uce",
    "seeds=1",
    "n_concepts=[1]",
    "evaluator=[clip_accuracy]",
    "sampler.steps=2",
    "sampler.batch_size=4",
    "task.prompts.settings.per_concept=1",
]
# stage folder and file suffix of each kind of artifact the runs above leave in the cache
KINDS = {
    "delta": ("erase", ".safetensors"),
    "erasure record": ("erase", ".json"),
    "image": ("images", ".png"),
    "scores": ("scores", ".json"),
}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\x00garbage\xff" * 2
    path.write_bytes(bytes(data))


def flip_a_bit(path: Path) -> None:
    """One bit near the end, where a delta or image keeps its numbers, a record its values."""
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A cache holding one run's artifacts, and that run's records.csv."""
    root = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FIA_BENCH_CACHE", str(root / "cache"))
        fia_bench.run([*JOB, "model=tiny_random"], out_dir=str(root / "run"))
    return root / "cache", (root / "run" / "records.csv").read_bytes()


@pytest.mark.parametrize("damage", [truncate, garble, flip_a_bit])
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_entry_is_set_aside_and_recomputed(
    kind: str,
    damage,
    warm: tuple[Path, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(warm[0], cache)
    stage, suffix = KINDS[kind]
    [victim, *_] = sorted((cache / stage).rglob(f"*{suffix}"))
    damage(victim)
    monkeypatch.setenv("FIA_BENCH_CACHE", str(cache))

    result = fia_bench.run(JOB, out_dir=str(tmp_path / "run"))

    stderr = capfd.readouterr().err
    assert f"damaged cache entry {stage}/" in stderr
    assert len(list((cache / "damaged" / stage).rglob(f"{victim.name}.*"))) == 1
    counts = result.counts
    recomputed = {
        "delta": counts["erased"],
        "erasure record": counts["erased"],
        "image": counts["images_generated"],
        "scores": counts["scored"],
    }[kind]
    assert recomputed >= 1
    assert (tmp_path / "run" / "records.csv").read_bytes() == warm[1]


def test_sealed_json_catches_a_changed_value_that_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_sealed_json(path, {"value": 12.5, "rows": [1, 2]})
    assert read_sealed_json(path) == {"value": 12.5, "rows": [1, 2]}
    path.write_text(path.read_text().replace("12.5", "13.5"))
    with pytest.raises(Damaged, match="recorded sha256"):
        read_sealed_json(path)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode


def test_inception_file_is_checked_by_sha256_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from fia_bench.cache import Cache
    from fia_bench.downloads import sha256_of
    from fia_bench.evaluators.fid import INCEPTION_URL, inception_weights

    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a))
    cache = Cache(tmp_path)
    planted = tmp_path / "downloads" / "clean-fid" / Path(INCEPTION_URL).name
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"a planted TorchScript file")
    with pytest.raises(FiaBenchError, match="no recorded sha256"):
        inception_weights(cache, None)
    with pytest.raises(FiaBenchError, match="refusing to load it"):
        inception_weights(cache, "0" * 64)
    planted.with_name(planted.name + ".sha256").write_text("f" * 64 + "\n")
    with pytest.raises(FiaBenchError, match="refusing to load it"):
        inception_weights(cache, None)
    assert inception_weights(cache, sha256_of(planted)) == planted
    assert not loaded
