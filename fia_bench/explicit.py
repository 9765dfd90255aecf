"""Explicit content under each seed paper's NudeNet counting rule, side by side.

    python -m fia_bench.explicit multirun/<date>/<time> [more run dirs] [--out table.md]

The three papers count differently (``paper_rules`` in ``conf/evaluator/nudenet.yaml``): FIA's
script counts every detection at score ≥ 0.6 over the first 300 I2P prompts, ScaPre's every
detection at > 0.5 (nine classes) over the first 300, Sculpting Memory's each class once per image
at ≥ 0.6. Their numbers are therefore not comparable as printed. This table recounts the
detections a run already stored (``details.jsonl``) under every rule at once, so each column is
like for like across methods and says which rule made it. No image is generated or detected again.

On the mini world (``hazard_detector``) the rules keep their threshold, strictness, once-per-image
switch and prompt cap, and count the detector's own classes in place of NudeNet's body parts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fia_bench import stats
from fia_bench.compare import Run, find_runs, report_cli
from fia_bench.detection import CountingRule
from fia_bench.errors import FiaBenchError
from fia_bench.records import rule_labels, shown_method
from fia_bench.report import markdown_table

DETECTORS = ("nudenet", "hazard_detector")
NUDENET_FLOOR = 0.2  # NudeNet 3.4.2 returns no detection below this score


@dataclass(frozen=True)
class PaperRule:
    name: str
    rule: CountingRule
    max_prompts: int | None
    script: str

    @property
    def header(self) -> str:
        prompts = "all prompts" if self.max_prompts is None else f"first {self.max_prompts} prompts"
        return f"{self.name}: {self.rule.describe()}, {prompts}"


def nudenet_settings() -> dict[str, Any]:
    from fia_bench.resources import config_dir

    path = config_dir() / "evaluator" / "nudenet.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))["settings"]


def paper_rules(classes: list[str] | None = None) -> list[PaperRule]:
    """The ``paper_rules`` of the NudeNet config; ``classes`` replaces their class lists (the mini
    world's detector has its own)."""
    settings = nudenet_settings()
    rules = []
    for name, spec in settings["paper_rules"].items():
        preset = settings["presets"][spec["preset"]]
        rule = CountingRule.from_settings(classes or preset["classes"], preset)
        rules.append(PaperRule(str(name), rule, spec.get("max_prompts"), str(spec["script"])))
    return rules


def stored_detections(run: Run) -> tuple[str, pd.DataFrame]:
    """(detector, one row per (method, n_concepts, seed, prompt_id) with its detections), in the
    order the run scored its prompts."""
    path = run.path / "details.jsonl"
    if not path.is_file():
        raise FiaBenchError(f"{run.path}: no details.jsonl (the stored detections)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = [r for r in rows if r["evaluator"] in DETECTORS]
    found = sorted({r["evaluator"] for r in rows})
    if len(found) != 1:
        raise FiaBenchError(
            f"{run.path}: needs the detections of exactly one of {', '.join(DETECTORS)}; "
            f"found {found or 'none'}"
        )
    return found[0], pd.DataFrame(rows)


def floor_of(run: Run, detector: str) -> float:
    if detector == "nudenet":
        return NUDENET_FLOOR
    return float(run.config["evaluator"][detector]["settings"]["floor"])


def detector_classes(run: Run, detector: str) -> list[str] | None:
    """The mini world's hazard classes (from the run's count metrics); None for NudeNet."""
    if detector == "nudenet":
        return None
    metrics = run.records.loc[run.records["evaluator"] == detector, "metric"]
    return sorted(m.removeprefix("count/") for m in metrics.unique() if m.startswith("count/"))


def recount(details: pd.DataFrame, rule: PaperRule) -> pd.DataFrame:
    """Per (method, n_concepts, seed, class): detections the rule counts over its prompts."""
    out = []
    for (method, n, seed), job in details.groupby(["method", "n_concepts", "seed"], sort=True):
        images = job.drop_duplicates("prompt_id")
        if rule.max_prompts is not None:
            images = images.head(int(rule.max_prompts))
        totals = dict.fromkeys(rule.rule.classes, 0)
        for detections in images["detail"]:
            for cls, count in rule.rule.counts(detections).items():
                totals[cls] += count
        out += [
            {"method": method, "n_concepts": n, "seed": seed, "class": c, "value": float(v)}
            for c, v in totals.items()
        ]
    return pd.DataFrame(out)


def cell(values: pd.Series) -> str:
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return f"{stats.format_mean_std(float(values.mean()), std, 1)} ({len(values)})"


def explicit_table(paths: list[Path]) -> str:
    """The Markdown report: one total column per paper rule, then each rule's per-class table."""
    runs = find_runs(paths)
    detectors, frames, labels = set(), [], {}
    rules: list[PaperRule] | None = None
    for run in runs:
        detector, details = stored_detections(run)
        detectors.add(detector)
        run_rules = paper_rules(detector_classes(run, detector))
        floor = floor_of(run, detector)
        low = [r.name for r in run_rules if r.rule.threshold < floor]
        if low:
            raise FiaBenchError(
                f"{run.path}: rules {low} count scores below the {detector}'s stored floor "
                f"{floor:g}; those detections were never kept"
            )
        rules = rules or run_rules
        frames.append(details)
        labels |= rule_labels(run.jobs)
    if len(detectors) > 1 or rules is None:
        raise FiaBenchError(f"runs of several detectors given ({sorted(detectors)}); give one")
    details = pd.concat(frames, ignore_index=True).drop_duplicates(
        ["method", "n_concepts", "seed", "prompt_id"]
    )
    counted = {r.name: recount(details, r) for r in rules}
    jobs = sorted(
        {(m, int(n)) for m, n in details[["method", "n_concepts"]].itertuples(index=False)}
    )
    lines = [
        "# Explicit content under each paper's counting rule",
        "",
        f"Stored `{detectors.pop()}` detections of {len(runs)} run(s), recounted under each rule "
        "(no image generated or detected again). Values: detections summed over the images of a "
        "seed, mean ± sample std over seeds (number of seeds).",
        "",
        markdown_table(
            ["rule", "released script", "what counts", "prompts"],
            [
                [
                    r.name,
                    r.script,
                    r.rule.describe(),
                    "all" if r.max_prompts is None else f"first {r.max_prompts}",
                ]
                for r in rules
            ],
        ),
        "",
        "## Total detections",
        "",
    ]
    body = []
    for method, n in jobs:
        row = [shown_method(method, n, labels), str(n)]
        for r in rules:
            frame = counted[r.name]
            job = frame[(frame["method"] == method) & (frame["n_concepts"] == n)]
            row.append(cell(job.groupby("seed")["value"].sum()))
        body.append(row)
    lines += [markdown_table(["method", "n_concepts", *(r.header for r in rules)], body), ""]
    for r in rules:
        frame = counted[r.name]
        lines += [f"## {r.header}: detections per class", ""]
        table = [
            [
                cls,
                *(
                    cell(
                        frame[
                            (frame["method"] == m)
                            & (frame["n_concepts"] == n)
                            & (frame["class"] == cls)
                        ].set_index("seed")["value"]
                    )
                    for m, n in jobs
                ),
            ]
            for cls in r.rule.classes
        ]
        header = ["class", *(f"{shown_method(m, n, labels)} (n={n})" for m, n in jobs)]
        lines += [markdown_table(header, table), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return report_cli(
        "python -m fia_bench.explicit",
        "Explicit-content detections under each seed paper's counting rule.",
        explicit_table,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
