"""Every config option composes, and every task of every world loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import fia_bench
from fia_bench.errors import FiaBenchError
from fia_bench.records import RECORD_COLUMNS, RUN_COLUMNS, check_complete
from fia_bench.tasks import load_task, worlds

CONF = Path(__file__).resolve().parent.parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{group}={name}"
        for group in ("model", "method", "task", "sampler", "logger", "experiment")
        for name in options(group)
    ],
)
def test_every_option_composes(override: str) -> None:
    cfg = fia_bench.compose([override])
    assert cfg.method.name and cfg.model.world and cfg.task.name and cfg.evaluator


@pytest.mark.parametrize("world", worlds())
def test_every_world_has_the_three_tasks(world: str) -> None:
    for task in ("objects", "styles", "explicit"):
        loaded = load_task(task, world)
        assert len(loaded.concepts) >= 2 and loaded.templates


def test_shipped_prompt_sets_match_their_generator(tmp_path: Path) -> None:
    from fia_bench.datasets.make_prompt_sets import main
    from fia_bench.tasks import data_root

    main(["--out", str(tmp_path)])
    for name in ("imagenette.csv", "imagenet50.csv"):
        assert (tmp_path / name).read_bytes() == (data_root() / "sd" / name).read_bytes()


def test_console_script_is_the_module() -> None:
    script = Path(sys.executable).parent / "fia-bench"
    out = subprocess.run(
        [str(script), "--cfg", "job", "method=uce"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout
    assert "name: uce" in out


def job_tables(n_prompts: int, metrics: str) -> pd.DataFrame:
    row = dict.fromkeys(RUN_COLUMNS, "")
    row.update(
        method="none", n_concepts=1, seed=0, status="ok", n_prompts=n_prompts, metrics=metrics
    )
    return pd.DataFrame([row], columns=RUN_COLUMNS)


def records(prompt_ids: list[str], metric: str = "accuracy") -> pd.DataFrame:
    rows = [
        dict.fromkeys(RECORD_COLUMNS, "")
        | {
            "method": "none",
            "n_concepts": 1,
            "seed": 0,
            "evaluator": "clip_accuracy",
            "metric": metric,
            "prompt_id": p,
            "value": 1.0,
        }
        for p in prompt_ids
    ]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def test_completeness_check_names_the_gap() -> None:
    check_complete(records(["a", "b", "c"]), job_tables(3, "clip_accuracy/accuracy=3"))
    with pytest.raises(
        FiaBenchError,
        match=r"none n_concepts=1 seed=0 "
        r"clip_accuracy/accuracy: 2 of 3 values",
    ):
        check_complete(records(["a", "b"]), job_tables(3, "clip_accuracy/accuracy=3"))
    with pytest.raises(FiaBenchError, match=r"fid/fid: 0 of 1 values"):
        check_complete(records(["a"]), job_tables(1, "clip_accuracy/accuracy=1;fid/fid=1"))


@pytest.mark.parametrize(
    ("model", "detector", "threshold"),
    [("tiny_random", "nudenet", None), ("mini", "hazard_detector", 0.5), ("sd14", "nudenet", None)],
)
def test_detector_alias_is_the_model_worlds_detector(
    model: str, detector: str, threshold: float | None
) -> None:
    from fia_bench.runner import selected_evaluators

    cfg = fia_bench.compose([f"model={model}", "evaluator=[detector,clip_score]"])
    selected = selected_evaluators(cfg)
    assert list(selected) == sorted([detector, "clip_score"])
    shipped = fia_bench.compose([f"model={model}", f"evaluator={detector}"])
    assert selected[detector] == selected_evaluators(shipped)[detector]
    if threshold is not None:  # keys under evaluator.detector override the shipped ones
        cfg = fia_bench.compose(
            [f"model={model}", "evaluator=detector", "+evaluator.detector.settings.floor=0.2"]
        )
        settings = selected_evaluators(cfg)[detector]["settings"]
        assert settings == {"threshold": threshold, "floor": 0.2}


def test_detector_alias_beside_its_evaluator_is_refused() -> None:
    from fia_bench.runner import selected_evaluators

    cfg = fia_bench.compose(["model=mini", "evaluator=[detector,hazard_detector]"])
    with pytest.raises(FiaBenchError, match="selects both detector and hazard_detector"):
        selected_evaluators(cfg)


def test_retain_narrows_every_counts_retain_set_to_the_listed_concepts_not_erased() -> None:
    """``retain=[...]`` keeps the task's order and drops what a count erases; unset, every
    concept not erased is retained, as before."""
    from fia_bench.runner import resolve_splits

    task = load_task("objects", "mini")
    kept = [task.concepts[7], task.concepts[2], task.concepts[12]]
    cfg = fia_bench.compose(["model=mini", "n_concepts=[1,5]", f"retain=[{','.join(kept)}]"])
    splits = resolve_splits(cfg, task)
    assert [(n, targets) for n, targets, _ in splits] == [
        (1, task.concepts[:1]),
        (5, task.concepts[:5]),
    ]
    assert [retain for *_, retain in splits] == [
        (task.concepts[2], task.concepts[7], task.concepts[12]),
        (task.concepts[7], task.concepts[12]),
    ]
    explicit = fia_bench.compose(
        ["model=mini", f"concepts=[{task.concepts[3]}]", f"retain=[{task.concepts[9]}]"]
    )
    assert resolve_splits(explicit, task) == [(1, (task.concepts[3],), (task.concepts[9],))]
    unset = resolve_splits(fia_bench.compose(["model=mini", "n_concepts=2"]), task)
    assert unset == [(2, task.concepts[:2], task.concepts[2:])]
