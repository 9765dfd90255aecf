"""Prompts from a CSV file in the ESD convention (case_id, prompt, evaluation_seed, concept).

The role column is derived from the run's split, so one file serves every concept count. Rows of
concepts outside the split are left out; a concept of the split without rows is an error."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from fia_bench.api import PROMPT_COLUMNS, PromptDataset, Task
from fia_bench.errors import FiaBenchError
from fia_bench.schema import Int, Schema, Text
from fia_bench.tasks import data_root

REQUIRED = ("case_id", "prompt", "evaluation_seed", "concept")


def read_prompt_file(path: str | Path) -> pd.DataFrame:
    """Read and check a prompt CSV; every problem is reported with the file and line. A relative
    path that does not exist here is looked up among the shipped prompt sets (datasets/data/)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (data_root() / path).is_file():
        path = data_root() / path
    if not path.is_file():
        raise FiaBenchError(f"prompt file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise FiaBenchError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from err
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise FiaBenchError(
            f"{path}:1: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(header) or 'no header'}; need {', '.join(REQUIRED)}"
        )
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            seed = int(row["evaluation_seed"])
        except (TypeError, ValueError):
            raise FiaBenchError(
                f"{path}:{line}: evaluation_seed must be an integer, got '{row['evaluation_seed']}'"
            ) from None
        if not (row["prompt"] or "").strip() or not (row["concept"] or "").strip():
            raise FiaBenchError(f"{path}:{line}: empty prompt or concept")
        rows.append((str(row["case_id"]), row["prompt"], seed, row["concept"].strip()))
    if not rows:
        raise FiaBenchError(f"{path}: has a header but no prompt rows")
    frame = pd.DataFrame(rows, columns=list(REQUIRED))
    duplicated = frame["case_id"][frame["case_id"].duplicated()]
    if len(duplicated):
        raise FiaBenchError(f"{path}: case_id '{duplicated.iloc[0]}' appears more than once")
    return frame


class PromptCsv(PromptDataset):
    SETTINGS = Schema(path=Text(), limit_per_concept=Int(ge=1, null=True))

    def __init__(self, path: str, limit_per_concept: int | None = None) -> None:
        super().__init__(path=str(path), limit_per_concept=limit_per_concept)
        self.path = path
        self.limit_per_concept = limit_per_concept

    def rows(self, task: Task, targets: tuple[str, ...], retain: tuple[str, ...]) -> pd.DataFrame:
        frame = read_prompt_file(self.path)
        parts = []
        for role, concepts in (("forget", targets), ("retain", retain)):
            for concept in concepts:
                part = frame[frame["concept"] == concept]
                if self.limit_per_concept is not None:
                    part = part.head(self.limit_per_concept)
                if part.empty:
                    raise FiaBenchError(f"{self.path}: no rows for concept '{concept}'")
                parts.append(part.assign(role=role))
        return pd.concat(parts, ignore_index=True)[list(PROMPT_COLUMNS)]
