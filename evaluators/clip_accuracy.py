"""Zero-shot classification of each generated image among all of the task's concepts.

The score of an image is 100 if its best-matching concept is the one it was prompted with, else 0;
averaged over a target concept's images it is the forget accuracy, over retained concepts the
retain accuracy. Classifying among every task concept, not just the split, keeps the chance level
the same for every concept count."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
import torch
from PIL import Image

from fia_bench.api import Evaluator, Score
from fia_bench.backbones import load_clip
from fia_bench.schema import Items, Schema, Text


class ClipAccuracy(Evaluator):
    SETTINGS: ClassVar[Schema] = Schema(templates=Items(Text(), min_items=1))
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True}
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        self.templates: list[str] = list(self.settings.get("templates") or ["a photo of a {}"])
        self.backbone = load_clip(self.context.judges["clip"], self.context.device)
        self.classes = list(self.context.task.concepts)
        texts = [t.format(c) for c in self.classes for t in self.templates]
        per_class = self.backbone.text_features(texts).view(
            len(self.classes), len(self.templates), -1
        )
        self.class_features = torch.nn.functional.normalize(per_class.mean(1), dim=-1)
        self.reset()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "judge": self.backbone.fingerprint,
            "classes": self.classes,
        }

    def protocol(self) -> str:
        return (
            f"clip={self.backbone.label}, "
            f"classes={len(self.classes)}, templates={len(self.templates)}"
        )

    def reset(self) -> None:
        self._scores: list[Score] = []

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        feats = self.backbone.image_features(images, list(rows["image_key"]))
        predicted = (feats @ self.class_features.T).argmax(dim=1).tolist()
        for (_, row), index in zip(rows.iterrows(), predicted, strict=True):
            correct = self.classes[index] == row["concept"]
            self._scores.append(Score(row["case_id"], "accuracy", 100.0 * correct))

    def compute(self) -> list[Score]:
        return list(self._scores)
