"""COCO captions as quality prompts (role ``quality``): CLIP_coco and FID are measured on them,
apart from the task's target and retain prompts.

The default source is the 30,000-caption CSV with per-row ``evaluation_seed`` shipped by the ESD
and FIA repositories (``case_number, prompt, evaluation_seed, coco_id``); any CSV with a caption
column works, e.g. a 10k subset via ``limit``."""

from __future__ import annotations

import pandas as pd

from fia_bench.api import PROMPT_COLUMNS, PromptDataset, Task
from fia_bench.downloads import fetch, read_table
from fia_bench.schema import Int, Schema, Text

COCO30K_URL = "https://raw.githubusercontent.com/rohitgandikota/erasing/main/data/coco_30k.csv"


class CocoCaptions(PromptDataset):
    SETTINGS = Schema(
        path=Text(null=True),
        url=Text(),
        sha256=Text(null=True),
        caption_column=Text(),
        seed_column=Text(),
        limit=Int(ge=1, null=True),
    )

    def __init__(
        self,
        path: str | None = None,
        url: str = COCO30K_URL,
        sha256: str | None = None,
        caption_column: str = "prompt",
        seed_column: str = "evaluation_seed",
        limit: int | None = None,
    ) -> None:
        super().__init__(
            path=path,
            url=url,
            sha256=sha256,
            caption_column=caption_column,
            seed_column=seed_column,
            limit=limit,
        )

    def rows(self, task: Task, targets: tuple[str, ...], retain: tuple[str, ...]) -> pd.DataFrame:
        s = self.settings
        local = fetch(
            "COCO captions",
            s["path"],
            s["url"],
            s["sha256"],
            self.cache,
            "task.quality.settings.path",
        )
        frame = read_table(local, (s["caption_column"], s["seed_column"]))
        if s["limit"]:
            frame = frame.head(int(s["limit"]))
        return pd.DataFrame(
            {
                "case_id": [f"coco-{i:05d}" for i in range(len(frame))],
                "prompt": frame[s["caption_column"]].astype(str).to_numpy(),
                "evaluation_seed": frame[s["seed_column"]].astype(int).to_numpy(),
                "concept": "coco",
                "role": "quality",
            }
        )[list(PROMPT_COLUMNS)]
