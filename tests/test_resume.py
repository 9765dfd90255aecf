"""A sweep killed with SIGKILL and re-run completes only what is missing and ends with the same
tables as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli, on_test_model

# 40 images in batches of 2: the run is killed a few batches in, long before it ends
ARGS = [
    "sampler.steps=2",
    "task.prompts.settings.per_concept=2",
    "sampler.batch_size=2",
    "seeds=2",
    "n_concepts=[1,2]",
]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    cli([*ARGS, f"hydra.run.dir={reference}"], tmp_path / "cache_a", tmp_path)

    cache = tmp_path / "cache_b"
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, FIA_BENCH_CACHE=str(cache))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fia_bench", *on_test_model([*ARGS, f"hydra.run.dir={killed_dir}"])],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    images = cache / "images"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if images.exists() and sum(1 for _ in images.rglob("*.png")) >= 6:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = sum(1 for _ in images.rglob("*.png"))
    assert not (killed_dir / "report.md").exists()

    resumed = tmp_path / "resumed"
    out = cli([*ARGS, f"hydra.run.dir={resumed}"], cache, tmp_path).stdout
    total = sum(1 for _ in (tmp_path / "cache_a" / "images").rglob("*.png"))
    assert f"generated {total - done_before} images" in out
    for name in ("report.md", "summary.csv", "tests.csv", "records.csv"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
