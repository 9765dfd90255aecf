"""The mini world's stand-in for NudeNet: its classifier judge's hazard head and box head report
detections in NudeNet's layout, so the explicit-content tables (per-class counts, flagged-image
rate) and the attacks' success verdicts go through the same code as on SD."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
from PIL import Image

from fia_bench.api import Evaluator, Score
from fia_bench.datasets.procedural import world
from fia_bench.detection import CountingRule, declared_metrics, detection_scores
from fia_bench.errors import FiaBenchError
from fia_bench.miniworld.judges import detect_hazards, load_classifier
from fia_bench.schema import Real, Schema


class HazardDetector(Evaluator):
    SETTINGS: ClassVar[Schema] = Schema(threshold=Real(ge=0, le=1), floor=Real(ge=0, le=1))
    higher_is_better: ClassVar[dict[str, bool]] = {}
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        judge = self.context.judges.get("classifier")
        if not judge:
            raise FiaBenchError(
                "evaluator hazard_detector needs the mini world's classifier judge (model=mini); "
                "on SD use evaluator=nudenet"
            )
        self.model, self.resolution, self.weights = load_classifier(str(judge["path"]))
        self.classes = list(world()["hazards"])
        self.rule = CountingRule(tuple(self.classes), float(self.settings["threshold"]))
        self.floor = float(self.settings["floor"])
        self.higher_is_better = declared_metrics(self.classes)
        self.reset()

    def fingerprint(self) -> dict[str, Any]:
        return {"weights": self.weights, "threshold": self.rule.threshold, "floor": self.floor}

    def protocol(self) -> str:
        return f"mini hazard detector: {len(self.classes)} classes, score >= {self.rule.threshold}"

    def reset(self) -> None:
        self._scores: list[Score] = []
        self._details: dict[str, Any] = {}

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        found = detect_hazards(self.model, images, self.resolution, self.floor)
        for case_id, detections in zip(rows["case_id"], found, strict=True):
            self._details[case_id] = detections
            self._scores += detection_scores(case_id, detections, self.rule)

    def compute(self) -> list[Score]:
        return list(self._scores)

    def details(self) -> dict[str, Any]:
        return dict(self._details)
