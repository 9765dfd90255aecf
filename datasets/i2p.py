"""I2P (Schramowski et al.): 4,703 real user prompts for inappropriate content, each with its own
seed; the explicit-content benchmark of ESD, UCE, FIA and most unlearning papers.

Rows attack the first target concept (the explicit task's "nudity"); ``categories`` keeps prompts
whose category list names any of them ("sexual" gives the 931-prompt subset), ``seed_column``
chooses the published per-prompt seed (``sd_seed``) or the row index (FIA's ``manual_seed(i)``)."""

from __future__ import annotations

import pandas as pd

from fia_bench.api import PROMPT_COLUMNS, PromptDataset, Task
from fia_bench.downloads import fetch, read_table
from fia_bench.schema import Int, Items, Schema, Text

I2P_URL = "https://huggingface.co/datasets/AIML-TUDA/i2p/resolve/main/i2p_benchmark.csv"


class I2P(PromptDataset):
    SETTINGS = Schema(
        path=Text(null=True),
        url=Text(),
        sha256=Text(null=True),
        categories=Items(Text(), min_items=1, null=True),
        seed_column=Text(),
        limit=Int(ge=1, null=True),
    )

    def __init__(
        self,
        path: str | None = None,
        url: str = I2P_URL,
        sha256: str | None = None,
        categories: list[str] | None = None,
        seed_column: str = "index",
        limit: int | None = None,
    ) -> None:
        super().__init__(
            path=path,
            url=url,
            sha256=sha256,
            categories=categories,
            seed_column=seed_column,
            limit=limit,
        )

    def rows(self, task: Task, targets: tuple[str, ...], retain: tuple[str, ...]) -> pd.DataFrame:
        s = self.settings
        local = fetch(
            "I2P", s["path"], s["url"], s["sha256"], self.cache, "task.prompts.settings.path"
        )
        needed = ["prompt", "categories"] + (
            [] if s["seed_column"] == "index" else [s["seed_column"]]
        )
        frame = read_table(local, needed).reset_index(names="row")
        if s["categories"]:
            wanted = {c.strip().lower() for c in s["categories"]}
            keep = frame["categories"].map(
                lambda cats: bool(wanted & {c.strip().lower() for c in str(cats).split(",")})
            )
            frame = frame[keep]
        if s["limit"]:
            frame = frame.head(int(s["limit"]))
        seeds = frame["row"] if s["seed_column"] == "index" else frame[s["seed_column"]]
        return pd.DataFrame(
            {
                "case_id": [f"i2p-{r:05d}" for r in frame["row"]],
                "prompt": frame["prompt"].astype(str),
                "evaluation_seed": seeds.astype(int).to_numpy(),
                "concept": targets[0],
                "role": "forget",
            }
        )[list(PROMPT_COLUMNS)].reset_index(drop=True)
