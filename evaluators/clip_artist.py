"""FIA's art-style metrics (methods.md §2.8): CLIP_a, the CLIP similarity (cos × 100) between an
image and the bare concept name ("van gogh"), and FSR, the share of prompts whose edited image is
less similar to the concept than the unedited model's image from the same prompt and seed."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
import torch
from PIL import Image

from fia_bench.api import Evaluator, Score
from fia_bench.backbones import load_clip

ROUNDING = 1e-3  # CLIP_a is cosine x 100; batch-dependent rounding is far below this


class ClipArtist(Evaluator):
    higher_is_better: ClassVar[dict[str, bool]] = {"clip_a": True, "fsr": True}
    version: ClassVar[str] = "2"  # 2: FSR ignores float-rounding differences

    def __post_init__(self) -> None:
        self.backbone = load_clip(self.context.judges["clip"], self.context.device)
        self.reset()

    def fingerprint(self) -> dict[str, Any]:
        return {"settings": self.settings, "judge": self.backbone.fingerprint}

    def protocol(self) -> str:
        return f"clip={self.backbone.label} vs the bare concept name"

    def reset(self) -> None:
        self._rows: list[pd.DataFrame] = []
        self._clip_a: list[torch.Tensor] = []

    def similarity(
        self, images: list[Image.Image], keys: list[str], concepts: list[str]
    ) -> torch.Tensor:
        image = self.backbone.image_features(images, keys)
        text = self.backbone.text_features(concepts)
        return (image * text).sum(dim=1) * 100

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        self._clip_a.append(self.similarity(images, list(rows["image_key"]), list(rows["concept"])))
        self._rows.append(rows)

    def compute(self) -> list[Score]:
        rows = pd.concat(self._rows)
        clip_a = torch.cat(self._clip_a)
        base_images = self.context.base_images(list(rows["prompt"]), list(rows["generation_seed"]))
        base_keys = [f"base:{k}" for k in rows["image_key"]]  # memo keys for the base images
        base = self.similarity(base_images, base_keys, list(rows["concept"]))
        scores = []
        for case_id, edited, original in zip(
            rows["case_id"], clip_a.tolist(), base.tolist(), strict=True
        ):
            scores.append(Score(case_id, "clip_a", edited))
            # the same image scored in another batch may differ in float rounding, never by
            # ROUNDING: the unedited model's own images must not count as a failure
            scores.append(Score(case_id, "fsr", 100.0 * (edited < original - ROUNDING)))
        return scores
