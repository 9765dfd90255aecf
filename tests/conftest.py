"""Shared fixtures: every test runs offline against the tiny random world with a private cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parent.parent
# Small enough for seconds per run, large enough that every stage does real work.
FAST = ["sampler.steps=2", "task.prompts.settings.per_concept=2", "sampler.batch_size=4"]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FIA_BENCH_CACHE", str(path))
    return path


def cli(
    args: list[str], cache: Path, cwd: Path, check: bool = True, module: str = "fia_bench"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, FIA_BENCH_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
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
