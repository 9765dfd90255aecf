"""ResNet-50 accuracy: both label-matching rules, and a run with a random-weights stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST

import fia_bench
from fia_bench.api import EvalContext
from fia_bench.evaluators.resnet_accuracy import ResNetAccuracy
from fia_bench.tasks import load_task

IMAGENETTE_IDS = {
    "tench": 0,
    "english springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "french horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


def evaluator(match: str) -> ResNetAccuracy:
    context = EvalContext(load_task("objects", "tiny"), {}, "cpu")
    return ResNetAccuracy(
        context, {"weights": "random", "match": match, "label_ids": IMAGENETTE_IDS}
    )


# FIA's either-direction substring rule also accepts these shorter ImageNet categories
NAME_RULE_EXTRAS = {"cassette player": [481], "chain saw": [488], "garbage truck": [395]}


@pytest.mark.parametrize("match", ["name", "ids"])
def test_imagenette_label_matching_rules(match: str) -> None:
    ev = evaluator(match)
    for concept, label in IMAGENETTE_IDS.items():
        matching = [i for i in range(1000) if ev.matches(concept, i)]
        extras = NAME_RULE_EXTRAS.get(concept, []) if match == "name" else []
        assert matching == sorted([label, *extras]), (concept, [ev.categories[i] for i in matching])


def test_run_with_random_weights_records_predicted_categories(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = fia_bench.run(
        [
            *FAST,
            "evaluator=[resnet_accuracy]",
            "seeds=1",
            "n_concepts=1",
            "evaluator.resnet_accuracy.settings.weights=random",
        ],
        out_dir=str(tmp_path / "run"),
    )
    assert set(result.records["value"]) <= {0.0, 100.0}
    details = [json.loads(line) for line in (tmp_path / "run" / "details.jsonl").open()]
    categories = evaluator("name").categories
    assert details and all(d["detail"] in categories for d in details)
