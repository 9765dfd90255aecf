"""AC: only the parameter group changes; training pulls the target caption's noise prediction to
the anchor caption's on anchor images, and leaves the UNet's grad flags as they were; and a
harness run."""

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
from methods.ac import ConceptAblation

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/ac.yaml").read_text())["settings"]


def ac(**overrides) -> ConceptAblation:
    return ConceptAblation(**(SETTINGS | {"images": 2, "steps": 3, "batch_size": 2} | overrides))


def request(engine, targets) -> EraseRequest:
    def base_images(prompts, seeds, negative_prompts=None):
        return engine.generate(prompts, seeds)

    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, 0, TASK, engine, base_images)


def gap(engine, method, req) -> float:
    """Mean squared gap between target-caption and anchor-caption predictions on fixed noised
    anchor latents (what the loss drives down)."""
    data = method.anchor_data(req)[0]
    unet = engine.pipe.unet
    g = torch.Generator().manual_seed(7)
    latents = data["mean"] * engine.pipe.vae.config.scaling_factor
    noisy = latents + torch.randn(latents.shape, generator=g)
    t = torch.full((len(latents),), 500)
    with torch.no_grad():
        a = unet(noisy, t, encoder_hidden_states=engine.encode(data["anchor"])).sample
        b = unet(noisy, t, encoder_hidden_states=engine.encode(data["target"])).sample
    return float((a - b).square().mean())


@pytest.mark.parametrize(
    ("group", "suffixes"),
    [("cross-attn", ("attn2.to_k.weight", "attn2.to_v.weight")), ("attn", None)],
)
def test_only_the_parameter_group_changes(group: str, suffixes) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    flags = [p.requires_grad for p in engine.pipe.unet.parameters()]
    method = ac(parameter_group=group, lr=1e-3)
    info = method.erase(request(engine, ["tench"]))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    trained = sorted(f"unet.{n}" for n in method.trainable(engine.pipe.unet))
    assert not non_finite and delta.changed and set(delta.changed) <= set(trained)
    if suffixes:
        assert all(n.endswith(suffixes) for n in trained) and len(trained) == 8
    else:
        assert any("attn1.to_q" in n for n in delta.changed)
        assert all(any(k in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in trained)
    assert info["trained_tensors"] == len(trained) and info["anchors"] == {"tench": "fish"}
    assert [p.requires_grad for p in engine.pipe.unet.parameters()] == flags


def test_training_pulls_the_target_prediction_to_the_anchor() -> None:
    engine = tiny_engine()
    method = ac(steps=30, lr=5e-3, images=2)
    req = request(engine, ["tench"])
    before = gap(engine, method, req)
    method.erase(req)
    assert gap(engine, method, req) < 0.75 * before


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(FiaBenchError, match="unknown AC parameter_group 'cross'"):
        ac(parameter_group="cross")
    with pytest.raises(FiaBenchError, match="needs a 'default' list"):
        ac(templates={"mini": ["a {}"]})


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=ac",
            "seeds=1",
            "n_concepts=[2]",
            "method.settings.images=2",
            "method.settings.steps=2",
            "method.settings.batch_size=2",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "ac"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    info = json.loads(runs.loc[2, "info"])
    assert runs.loc[2, "changed_tensors"] == info["trained_tensors"] == 8
