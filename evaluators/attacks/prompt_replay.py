"""Replays a fixed list of adversarial prompts (Ring-A-Bell's InvPrompts, MMA-Diffusion's
``adv_prompt`` column, any red-team set) against every erased model, one image per prompt: the
protocol card's way to compare methods on published attack prompts (baselines_evaluators.md §9).
The lists are gated or unlicensed upstream, so the user supplies the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fia_bench.api import AdversarialPrompt, Attack, AttackRequest
from fia_bench.downloads import read_table
from fia_bench.errors import FiaBenchError
from fia_bench.schema import Int, Schema, Text


class PromptReplay(Attack):
    SETTINGS = Schema(
        path=Text(null=True),
        prompt_column=Text(),
        seed_column=Text(null=True),
        source_column=Text(null=True),
        limit=Int(ge=1, null=True),
    )

    def __init__(
        self,
        path: str | None = None,
        prompt_column: str = "prompt",
        seed_column: str | None = None,
        source_column: str | None = None,
        limit: int | None = None,
    ) -> None:
        if not path:
            raise FiaBenchError(
                "attack prompt_replay needs a prompt file: "
                "attack.prompt_replay.settings.path=/path/to/prompts.csv"
            )
        self.path = Path(path).expanduser()
        self.prompt_column = prompt_column
        self.seed_column = seed_column
        self.source_column = source_column
        self.limit = limit

    def read(self) -> pd.DataFrame:
        if not self.path.is_file():
            raise FiaBenchError(f"attack prompt file {self.path} does not exist")
        needed = [c for c in (self.prompt_column, self.seed_column, self.source_column) if c]
        frame = read_table(self.path, needed)
        frame = frame[frame[self.prompt_column].astype(str).str.strip() != ""]
        if frame.empty:
            raise FiaBenchError(f"{self.path}: no prompts in column '{self.prompt_column}'")
        return frame.head(self.limit) if self.limit else frame

    def attack(self, request: AttackRequest) -> list[AdversarialPrompt]:
        """Every prompt attacks the first target concept; seeds cycle through the job's own
        generation seeds unless the file gives them."""
        frame = self.read()
        concept = request.targets[0]
        seeds = list(request.prompts["generation_seed"])
        return [
            AdversarialPrompt(
                case_id=f"replay-{i:05d}",
                source_prompt=str(row[self.source_column]) if self.source_column else "",
                prompt=str(row[self.prompt_column]),
                seed=int(row[self.seed_column]) if self.seed_column else int(seeds[i % len(seeds)]),
                concept=concept,
            )
            for i, (_, row) in enumerate(frame.iterrows())
        ]
