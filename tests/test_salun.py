"""SalUn: the saliency mask keeps the top fraction of |summed gradient| over the whole UNet; the
fine-tuning moves only masked entries; and a harness run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST as FAST_RUN
from conftest import REPO
from tiny import tiny_engine

import fia_bench
from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.records import registered_name
from fia_bench.tasks import load_task
from methods.salun import SalUn, saliency_mask

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/salun.yaml").read_text())["settings"]


def salun(**overrides) -> SalUn:
    small = {"images_per_concept": 2, "retain_images_per_concept": 1, "epochs": 1, "batch_size": 2}
    return SalUn(**(SETTINGS | small | overrides))


def request(engine, targets) -> EraseRequest:
    def base_images(prompts, seeds, negative_prompts=None):
        return engine.generate(prompts, seeds)

    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, 0, TASK, engine, base_images)


def test_saliency_mask_keeps_the_largest_fraction_over_all_tensors() -> None:
    grads = {"a": torch.tensor([[0.1, -5.0], [2.0, 0.0]]), "b": torch.tensor([-3.0, 1.0, 0.5, 4.0])}
    masks = saliency_mask(grads, 0.5)  # int(8 * 0.5) = 4 largest |g|: 5, 4, 3, 2
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [True, False, False, True]
    assert sum(int(m.sum()) for m in saliency_mask(grads, 1.0).values()) == 8


def test_only_salient_entries_move() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    method = salun(lr=1e-3, threshold=0.3)
    req = request(engine, ["tench"])
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
    torch.manual_seed(0)
    forget = method.images(req, ["tench"], method.images_per_concept)
    masks = method.mask(req, forget, scheduler)  # the mask erase will compute, same seed
    torch.manual_seed(0)
    info = method.erase(req)
    assert info["salient_fraction"] == pytest.approx(0.3, abs=1e-3)
    assert (
        info["pseudo"] == {"tench": "english springer"}
        and info["retain_images"] == len(TASK.concepts) - 1
    )
    moved_any = False
    for name, p in engine.pipe.unet.named_parameters():
        changed = p.detach() != base[f"unet.{name}"]
        assert not (changed & ~masks[name]).any(), name  # nothing outside the mask
        moved_any |= bool(changed.any())
    assert moved_any
    assert all(not p.requires_grad or p.grad is None for p in engine.pipe.unet.parameters())


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(FiaBenchError, match=r"threshold=0\.0"):
        salun(threshold=0.0)
    with pytest.raises(FiaBenchError, match=r"prompt\.default: needs"):
        salun(prompt={"default": "a photo"})


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=salun",
            "seeds=1",
            "n_concepts=[2]",
            "method.settings.images_per_concept=2",
            "method.settings.retain_images_per_concept=1",
            "method.settings.epochs=1",
            "method.settings.batch_size=2",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "salun"].set_index(
        "n_concepts"
    )
    assert set(runs["status"]) == {"ok"}
    assert json.loads(runs.loc[2, "info"])["salient_fraction"] == pytest.approx(0.5, abs=1e-3)
