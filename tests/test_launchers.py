"""Hydra launchers: a sweep run as parallel jobs (joblib) on one shared cache gives the tables
a sequential sweep gives, without making any image twice; the SLURM launcher config composes
into the submitit plugin's launcher."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import FAST, ONE_THREAD, cli
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from fia_bench.cli import check_overrides
from fia_bench.resources import config_dir

SWEEP = ["-m", "method=none,uce", "model=tiny_random", "seeds=1", "n_concepts=[1]", *FAST]
TABLES = ("records.csv", "runs.csv", "summary.csv", "tests.csv", "report.md")


def generated(stdout: str) -> int:
    """Images the sweep's jobs generated, summed over jobs."""
    return sum(int(n) for n in re.findall(r"generated (\d+) images", stdout))


def test_parallel_sweep_equals_sequential_sweep(tmp_path: Path) -> None:
    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    one = cli(
        [*SWEEP, f"hydra.sweep.dir={sequential}"], tmp_path / "cache_1", tmp_path, env=ONE_THREAD
    )
    launcher = ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    two = cli(
        [*SWEEP, *launcher, f"hydra.sweep.dir={parallel}"],
        tmp_path / "cache_2",
        tmp_path,
        env=ONE_THREAD,
    )

    jobs = sorted(p.name for p in sequential.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs == sorted(p.name for p in parallel.iterdir() if p.is_dir())
    for job in jobs:
        for name in TABLES:
            assert (parallel / job / name).read_bytes() == (sequential / job / name).read_bytes()
    # both jobs need the base images; the shared cache's locks let only one of them make each
    assert generated(two.stdout) == generated(one.stdout) > 0
    images = {
        cache: {p.name: p.read_bytes() for p in (tmp_path / cache / "images").rglob("*.png")}
        for cache in ("cache_1", "cache_2")
    }
    assert images["cache_1"] == images["cache_2"]
    leftovers = [p for p in (tmp_path / "cache_2").rglob("*") if p.suffix in (".lock", ".tmp")]
    assert leftovers == []


def test_slurm_launcher_composes_into_the_submitit_plugin() -> None:
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    check_overrides(overrides)  # the command line accepts it
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
