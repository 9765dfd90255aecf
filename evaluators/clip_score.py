"""CLIP score of each image against its own prompt: 100 × max(cos, 0), as torchmetrics defines it.

Written against open_clip directly because torchmetrics' CLIPScore breaks on transformers 5."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
from PIL import Image

from fia_bench.api import Evaluator, Score
from fia_bench.backbones import load_clip


class ClipScore(Evaluator):
    higher_is_better: ClassVar[dict[str, bool]] = {"clip_score": True}
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        self.backbone = load_clip(self.context.judges["clip"], self.context.device)
        self.reset()

    def fingerprint(self) -> dict[str, Any]:
        return {"settings": self.settings, "judge": self.backbone.fingerprint}

    def protocol(self) -> str:
        return f"clip={self.backbone.label}, cos x 100 clipped at 0"

    def reset(self) -> None:
        self._scores: list[Score] = []

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        image = self.backbone.image_features(images, list(rows["image_key"]))
        text = self.backbone.text_features(list(rows["prompt"]))
        cosine = (image * text).sum(dim=1).clamp(min=0) * 100
        self._scores.extend(
            Score(case_id, "clip_score", float(v))
            for case_id, v in zip(rows["case_id"], cosine.tolist(), strict=True)
        )

    def compute(self) -> list[Score]:
        return list(self._scores)
