"""Run the mini-world analogue of every paper-table recipe at full mini size on a CPU and write
its comparison report to docs/comparisons/mini/ (docs/reproducing_tables.md, "Mini-world
analogues"). Each recipe's jobs are the ones ``python -m fia_bench -m experiment=mini/<recipe>``
launches; only methods and attacks whose paper budgets take hours on a laptop CPU get the
overrides of mini_cpu_budgets.yaml, and each report's preface names them. Runs and edits are
cached, so an interrupted call resumes where it stopped.

    python experiments/mini_comparisons.py [fia/table1 fia/fig6 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import fia_bench
from fia_bench.cache import write_text
from fia_bench.compare import compare
from fia_bench.errors import FiaBenchError
from fia_bench.plan import compose_with_hydra, sweep_jobs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MINI_RECIPES = REPO / "conf" / "experiment" / "mini"
BUDGETS = HERE / "mini_cpu_budgets.yaml"
DOCS = REPO / "docs" / "comparisons" / "mini"
RUNS = REPO / "multirun" / "mini"


def all_recipes() -> list[str]:
    return sorted(
        p.relative_to(MINI_RECIPES).with_suffix("").as_posix() for p in MINI_RECIPES.rglob("*.yaml")
    )


def job_label(index: int, swept: list[str]) -> str:
    """``<n>-<swept values>``, as the recipes name their sweep subdirectories."""
    values = [o.split("=", 1)[1].split("/")[-1] for o in swept]
    return "-".join([str(index), *values])


def budget_overrides(cfg: Any, budgets: dict[str, Any]) -> list[str]:
    extra = list(budgets["methods"].get(str(cfg.method.name)) or [])
    if cfg.get("attack"):
        extra += budgets["attacks"]
    return extra


def run_recipe(name: str, budgets: dict[str, Any]) -> dict[str, Any]:
    """Run every job of the recipe's sweep; returns what the report's preface says of them."""
    recipe = f"experiment=mini/{name}"
    jobs = sweep_jobs([recipe])
    done = []
    for index, overrides in enumerate(jobs):
        extra = budget_overrides(compose_with_hydra(overrides), budgets)
        label = job_label(index, overrides[1:])
        start = time.perf_counter()
        result = fia_bench.run([*overrides, *extra], out_dir=str(RUNS / name / label))
        done.append(
            {
                "job": label,
                "overrides": overrides[1:],
                "cpu_budget": extra,
                "seconds": round(time.perf_counter() - start, 1),
                "counts": result.counts,
            }
        )
    return {"recipe": name, "jobs": done}


def work_done(counts: dict[str, Any]) -> str:
    """What a job made in this call and what it took from the cache: a short wall time beside
    nothing made is a rerun of cached work, not the job's cost."""

    def edits(n: int) -> str:
        return f"{n} edit" if n == 1 else f"{n} edits"

    made = f"{edits(counts['erased'])}, {counts['images_generated']:,} images"
    return f"{made} ({edits(counts['erase_cached'])}, {counts['images_cached']:,} images cached)"


def preface(run: dict[str, Any]) -> str:
    lines = [
        f"<!-- written by `python experiments/mini_comparisons.py {run['recipe']}` "
        "(make comparisons-mini) -->",
        "",
        "| job | overrides | CPU budget (mini_cpu_budgets.yaml) | wall time | made in this call |",
        "|---|---|---|---|---|",
    ]
    for job in run["jobs"]:
        budget = ", ".join(f"`{o}`" for o in job["cpu_budget"]) or "as the recipe"
        swept = ", ".join(f"`{o}`" for o in job["overrides"]) or "—"
        lines.append(
            f"| {job['job']} | {swept} | {budget} | {job['seconds']:.0f} s "
            f"| {work_done(job['counts'])} |"
        )
    lines.append(
        "\nWall times are for this call on a 2-core CPU; images and edits already in the cache "
        "(from an earlier recipe or call) cost nothing; the last column counts them."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/mini_comparisons.py", description=__doc__)
    parser.add_argument("recipes", nargs="*", help="e.g. fia/table1 (default: every mini recipe)")
    args = parser.parse_args(argv)
    known = all_recipes()
    unknown = [r for r in args.recipes if r not in known]
    if unknown:
        print(f"unknown recipe(s) {unknown}; choices: {' '.join(known)}", file=sys.stderr)
        return 2
    budgets = yaml.safe_load(BUDGETS.read_text())
    for name in args.recipes or known:
        try:
            run = run_recipe(name, budgets)
            report = compare([RUNS / name])
        except FiaBenchError as err:
            print(f"mini comparison {name}: error: {err}", file=sys.stderr)
            return 2
        out = DOCS / f"{name.replace('/', '_')}.md"
        title, rest = report.split("\n", 1)
        write_text(out, f"{title}\n\n{preface(run)}{rest}")
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
