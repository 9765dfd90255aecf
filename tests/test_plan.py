"""The dry run: it predicts exactly what a run will erase and generate, sees what the cache holds
by computing the stages' own keys, expands a recipe's sweep as Hydra does, and turns image and
edit counts into GPU-hours with the spec's H100 figures."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, cli

import fia_bench
from fia_bench.cli import main
from fia_bench.errors import FiaBenchError
from fia_bench.plan import THROUGHPUT_FILE, Planner, dry_run, load_throughput, sweep_jobs

JOB = ["model=tiny_random", "method=uce", "seeds=2", "n_concepts=[1,2]", *FAST]


@pytest.mark.parametrize("policy", ["erase", "erase_and_generate"])
def test_plan_predicts_the_run_and_then_sees_its_cache(
    tmp_path: Path, cache_dir: Path, policy: str
) -> None:
    overrides = [*JOB, f"seed_policy={policy}"]
    before = Planner().plan(fia_bench.compose(overrides), "0")
    result = fia_bench.run(overrides, out_dir=str(tmp_path / "run"))
    assert len(before.erase_todo) == result.counts["erased"]
    if policy == "erase_and_generate":
        assert before.images_todo == result.counts["images_generated"]
    else:  # UCE gives both seeds the same edit, which only the run can know: an upper bound
        assert before.images_todo == 20 * (1 + 2 * 2) > result.counts["images_generated"] == 60
    after = Planner().plan(fia_bench.compose(overrides), "0")
    assert (after.erase_todo, after.images_todo) == ([], 0)
    assert after.erase_cached == result.counts["erased"]
    assert after.images_cached == result.counts["images_generated"]
    # one concept count more: only the new split's edits and the new method images are to do
    grown = Planner().plan(fia_bench.compose([*overrides, "n_concepts=[1,2,3]"]), "0")
    assert [n for _, n in grown.erase_todo] == [3] * 4  # (none + uce) x 2 seeds
    assert grown.images_cached == after.images_cached


def test_plan_keys_a_guided_jobs_images_as_the_run_does(tmp_path: Path, cache_dir: Path) -> None:
    """SLD edits no weight: its images are its own (the guidance is in their keys), each with a
    third UNet branch to pay for, and a second plan finds them all in the cache."""
    overrides = ["model=tiny_random", "method=sld", "seeds=1", "n_concepts=[1]", *FAST]
    before = Planner().plan(fia_bench.compose(overrides), "0")
    result = fia_bench.run(overrides, out_dir=str(tmp_path / "run"))
    assert before.images_todo == result.counts["images_generated"] > 0
    assert before.extra_branches == before.images_todo // 2  # SLD's half of them
    after = Planner().plan(fia_bench.compose(overrides), "0")
    assert (after.images_todo, after.images_shared, after.extra_branches) == (0, 0, 0)
    assert after.images_cached == result.counts["images_generated"]
    figures = load_throughput()
    assert 0 < figures.branch_share(50) < 0.5


def test_sweep_expands_like_hydra_and_the_command_line_wins() -> None:
    alphas = sweep_jobs(["experiment=fia/ablation_alpha"])
    assert [j[-1] for j in alphas] == [f"method.settings.alpha={a}" for a in (0.1, 0.4, 0.6, 0.8)]
    arms = sweep_jobs(["experiment=fia/table1", "+experiment/arm=uce,esd_x", "seeds=1,2"])
    assert len(arms) == 4
    assert {j[-2] for j in arms} == {"+experiment/arm=uce", "+experiment/arm=esd_x"}
    with pytest.raises(FiaBenchError, match="add -m"):
        dry_run(["experiment=fia/table1", "seeds=1,2"], multirun=False)


def test_generation_rate_scales_with_steps_batch_and_precision(tmp_path: Path) -> None:
    figures = load_throughput(bench=tmp_path / "absent.json")
    assert figures.generation_rate("bf16", 32, 50)[0] == pytest.approx(3.17)
    assert figures.generation_rate("bf16", 16, 50)[0] == pytest.approx(2.90)  # batch 8 measured
    assert figures.generation_rate("fp16", 64, 50)[0] == figures.generation_rate("bf16", 64, 50)[0]
    half = figures.generation_rate("fp32", 5, 25)[0] / figures.generation_rate("fp32", 5, 50)[0]
    assert half == pytest.approx((50 * 1.607 + 2.51) / (25 * 1.607 + 2.51))
    assert figures.erase_seconds("fia", 10) == pytest.approx(113.0)
    with pytest.raises(FiaBenchError, match="no erasure cost for method 'mystery'"):
        figures.erase_seconds("mystery", 1)


def test_a_measured_benchmark_replaces_its_precision_and_batch_only(tmp_path: Path) -> None:
    bench = tmp_path / "bench_sd_cuda.json"
    generation = {"engine_images_per_s": 5.0, "steps": 50, "batch_size": 32, "precision": "bf16"}
    bench.write_text(json.dumps({"generation": generation}))
    figures = load_throughput(bench=bench)
    rate, basis = figures.generation_rate("bf16", 48, 50)
    assert rate == 5.0 and "bench_sd_cuda.json" in basis
    assert "bench_sd_cuda.json" not in figures.generation_rate("bf16", 16, 50)[1]
    assert figures.generation_rate("fp16", 48, 50)[0] == 5.0  # fp16 follows bf16
    assert figures.generation_rate("bf16", 64, 50)[0] == pytest.approx(3.24)  # the spec's batch 64
    assert figures.generation_rate("bf16", 1, 50)[0] == pytest.approx(0.57)
    assert figures.generation_rate("fp32", 5, 50)[0] == pytest.approx(0.64)
    # measured at 25 steps, it enters the table as the rate it implies at the spec's 50
    bench.write_text(json.dumps({"generation": generation | {"steps": 25}}))
    figures = load_throughput(bench=bench)
    assert figures.generation_rate("bf16", 32, 25)[0] == pytest.approx(5.0)
    bench.write_text(json.dumps({"generation": {"engine_images_per_s": 5.0}}))
    with pytest.raises(FiaBenchError, match="lacks steps, batch_size, precision"):
        load_throughput(bench=bench)
    bench.write_text(json.dumps({"generation": generation | {"resolution": 128}}))
    with pytest.raises(FiaBenchError, match="measured at 128 px"):
        load_throughput(bench=bench)


def test_dry_run_of_fia_table1_on_sd15_projects_gpu_hours(cache_dir: Path) -> None:
    text = dry_run(["experiment=fia/table1", "model=sd15"], multirun=True)
    images = int(re.search(r"totals: \d+ edits to make \(\d+ cached\), (\d+) images", text)[1])
    # the unedited model's 500 Imagenette + 30,000 COCO images once, and (no edit being cached)
    # each method's per seed: 8 methods x 3 seeds
    assert images == 30_500 * (1 + 8 * 3)
    figures = yaml.safe_load(THROUGHPUT_FILE.read_text())
    costs = figures["erase_seconds"]
    trained = ("fia", "conceptprune", "mace", "ac", "fmn", "salun")
    per_concept = sum(costs[m]["per_concept"] for m in trained)
    per_seed = per_concept * 10
    edits = 3 * (per_seed + costs["uce"]["fixed"] + costs["esd"]["fixed"])
    hours = (images / 2.90 + edits) / 3600  # fp16 at batch 16: the bf16 batch-8 rate
    printed = float(re.search(r"\*\*([\d.]+) h\*\*", text)[1])
    assert printed == pytest.approx(hours, abs=0.05)
    assert "recipe `fia/table1`" in text and "model `sd15`" in text
    assert text.count("+experiment/arm=") == 8


def test_cli_dry_run_prints_the_plan_and_does_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    mini = [
        "experiment=mini/fia/table2",
        "model=tiny_random",
        "concepts=null",
        "retain=null",
        "n_concepts=5",
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fia_bench", *mini, *FAST, "--dry-run"])
    main()
    out = capsys.readouterr().out
    assert "Without -m Hydra runs only this job; add -m to run the recipe's 8 jobs." in out
    assert "no GPU-hour projection" in out
    assert not (tmp_path / "outputs").exists() and not cache_dir.exists()


def test_cli_dry_run_errors_are_one_line(tmp_path: Path, cache_dir: Path) -> None:
    bad = cli(["experiment=fia/tabel1", "--dry-run"], cache_dir, tmp_path, check=False)
    assert bad.returncode == 2
    assert "did you mean 'fia/table1'?" in bad.stderr and len(bad.stderr.splitlines()) == 1
    flag = cli(["--dry-run", "--cfg", "job"], cache_dir, tmp_path, check=False)
    assert flag.returncode == 2 and "takes overrides and -m only" in flag.stderr
    plus = cli(["+experiment=fia/table1", "--dry-run"], cache_dir, tmp_path, check=False)
    assert plus.returncode == 2 and plus.stderr.strip().endswith("write experiment=fia/table1")
