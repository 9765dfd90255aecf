"""The result schema: one row per measured value, one row per (method, n_concepts, seed) job, and
the completeness check that turns any gap into an error instead of a smaller denominator."""

from __future__ import annotations

import json

import pandas as pd

from fia_bench.errors import FiaBenchError

RECORD_COLUMNS = [
    "method",
    "n_concepts",
    "seed",
    "concept",
    "role",
    "prompt_id",
    "evaluator",
    "metric",
    "value",
    "higher_is_better",
    "image_key",
    "model",
    "task",
    "sampler",
    "protocol",
]
RUN_COLUMNS = [
    "method",
    "n_concepts",
    "seed",
    "status",
    "reason",
    "targets",
    "n_prompts",
    "metrics",
    "erase_key",
    "weights_id",
    "changed_tensors",
    "changed_entries",
    "info",
]
JOB_KEYS = ["method", "n_concepts", "seed"]


def check_complete(records: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Every successful job must have every declared metric as often as it declared it.

    ``runs.metrics`` lists ``evaluator/metric=count`` entries: the number of prompt rows, 1 for a
    set-level metric, the number of adversarial prompts for an attack.
    """
    problems: list[str] = []
    grouped = {key: frame for key, frame in records.groupby([*JOB_KEYS, "evaluator", "metric"])}
    for job in runs[runs["status"] == "ok"].itertuples():
        for entry in str(job.metrics).split(";"):
            if not entry:
                continue
            name, _, count = entry.rpartition("=")
            evaluator, metric = name.split("/", 1)
            expected = int(count)
            frame = grouped.get((job.method, job.n_concepts, job.seed, evaluator, metric))
            actual = 0 if frame is None else len(frame)
            if actual != expected:
                problems.append(
                    f"{job.method} n_concepts={job.n_concepts} seed={job.seed} "
                    f"{evaluator}/{metric}: {actual} of {expected} values"
                )
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise FiaBenchError(f"incomplete results, refusing to aggregate: {shown}")


def check_one_build(runs: list[tuple[str, str, str]]) -> None:
    """Refuse to merge ``(run directory, model name, weight fingerprint)`` runs that measured two
    builds of one model: a retrained model keeps its name, methods and seeds, so its rows would
    otherwise sit beside the old build's in one table without a clash to reveal them."""
    first: dict[str, tuple[str, str]] = {}
    for run_dir, model, weights in runs:
        seen_dir, seen_weights = first.setdefault(model, (run_dir, weights))
        if weights != seen_weights:
            raise FiaBenchError(
                f"runs of model {model!r} loaded different weights: {seen_dir} has "
                f"{seen_weights[:12]}, {run_dir} has {weights[:12]}; merge the runs of one "
                "build (move the other build's run directories out of the way)"
            )


def rule_labels(runs: pd.DataFrame) -> dict[tuple[str, int], str]:
    """(method, n_concepts) → the rule its erasures applied, where a method's info names one
    (``info["rule"]``, e.g. FIA's fusion when ⌈α·C⌉ = 1), so no table shows such a row bare."""
    rules: dict[tuple[str, int], set[str]] = {}
    for job in runs[runs["status"] == "ok"].itertuples():
        info = job.info if isinstance(job.info, str) and job.info else "{}"
        rule = json.loads(info).get("rule")
        if rule:
            rules.setdefault((str(job.method), int(job.n_concepts)), set()).add(str(rule))
    return {key: " / ".join(sorted(found)) for key, found in rules.items()}


def shown_method(method: str, n_concepts: int, labels: dict[tuple[str, int], str]) -> str:
    """The method's name as tables print it: with its rule where it applied one."""
    rule = labels.get((method, int(n_concepts)))
    return f"{method} [{rule}]" if rule else method
