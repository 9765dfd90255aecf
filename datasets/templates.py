"""Prompts written from the task's templates: ``per_concept`` rows per concept, cycling templates.

Row ``i`` of a concept gets evaluation seed ``seed_base + i`` whatever the split, so a concept's
images are identical whether it is erased or retained and the base model's images are shared by
every concept count."""

from __future__ import annotations

import pandas as pd

from fia_bench.api import PROMPT_COLUMNS, PromptDataset, Task
from fia_bench.errors import FiaBenchError
from fia_bench.schema import Int, Schema


class TemplatePrompts(PromptDataset):
    SETTINGS = Schema(per_concept=Int(ge=1), seed_base=Int(ge=0))

    def __init__(self, per_concept: int = 4, seed_base: int = 0) -> None:
        if per_concept <= 0:
            raise FiaBenchError(f"task.prompts.per_concept must be > 0, got {per_concept}")
        super().__init__(per_concept=per_concept, seed_base=seed_base)
        self.per_concept = per_concept
        self.seed_base = seed_base

    def rows(self, task: Task, targets: tuple[str, ...], retain: tuple[str, ...]) -> pd.DataFrame:
        records = []
        for role, concepts in (("forget", targets), ("retain", retain)):
            for concept in concepts:
                for i in range(self.per_concept):
                    template = task.templates[i % len(task.templates)]
                    records.append(
                        (
                            f"{concept.replace(' ', '_')}-{i:04d}",
                            template.format(concept=concept),
                            self.seed_base + i,
                            concept,
                            role,
                        )
                    )
        return pd.DataFrame(records, columns=list(PROMPT_COLUMNS))
