"""Shared fixtures: every test runs offline with a private cache, and on the tiny random world
unless it names a model (the shipped default, the mini world, runs where a test asks for it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a worker's torch threads (and those of the runs it
    # starts) would only contend with the other workers', and small models slow down many times
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# Small enough for seconds per run, large enough that every stage does real work.
FAST = ["sampler.steps=2", "task.prompts.settings.per_concept=2", "sampler.batch_size=4"]


def on_test_model(overrides: list[str]) -> list[str]:
    named = any(o.split("=")[0].lstrip("+~") == "model" for o in overrides)
    # appended: Hydra's command line takes flags such as -m before the overrides
    return list(overrides) if named else [*overrides, "model=tiny_random"]


@pytest.fixture(autouse=True)
def tiny_model_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import fia_bench

    compose = fia_bench.compose
    monkeypatch.setattr(
        fia_bench, "compose", lambda overrides=None: compose(on_test_model(overrides or []))
    )


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FIA_BENCH_CACHE", str(path))
    return path


# CPU convolutions round differently with the thread count, so runs whose outputs are compared
# byte for byte use one thread per process (what torchrun and joblib's workers get by default)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """A module of tiny models computes on one thread: they gain nothing from more, which
    contend on a busy machine, and a sum split over threads can round differently from one
    process to another (a serial run once failed a byte-for-byte comparison that way)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(
    args: list[str],
    cache: Path,
    cwd: Path,
    check: bool = True,
    module: str = "fia_bench",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = dict(os.environ, FIA_BENCH_CACHE=str(cache), **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *(on_test_model(args) if module == "fia_bench" else args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc
