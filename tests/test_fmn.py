"""FMN: training shrinks the concept tokens' cross-attention; it changes the UNet (or only its
cross-attention with only_optimize_ca) and restores grad flags and attention processors; and a
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
from fia_bench.unet_edit import concept_token_mask, cross_attention_probabilities
from methods.fmn import FMN

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/fmn.yaml").read_text())["settings"]


def fmn(**overrides) -> FMN:
    return FMN(**(SETTINGS | {"images_per_concept": 2, "steps": 3} | overrides))


def request(engine, targets) -> EraseRequest:
    def base_images(prompts, seeds, negative_prompts=None):
        return engine.generate(prompts, seeds)

    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, 0, TASK, engine, base_images)


def attention_on_concept(engine, method, req) -> float:
    """The loss's quantity on fixed noised latents of the concept's training images."""
    data = method.training_set(req)
    unet = engine.pipe.unet
    g = torch.Generator().manual_seed(3)
    total = 0.0
    with torch.no_grad(), cross_attention_probabilities(unet) as probs:
        for concept, prompt, mean, _ in data:
            latent = mean[None] * engine.pipe.vae.config.scaling_factor
            noisy = latent + torch.randn(latent.shape, generator=g)
            mask = concept_token_mask(engine.pipe.tokenizer, prompt, concept, pooler=True)
            probs.clear()
            unet(noisy, torch.tensor([500]), encoder_hidden_states=engine.encode([prompt]))
            total += float(torch.cat([p[..., mask].flatten() for p in probs]).norm())
    return total


def test_training_shrinks_the_concepts_attention() -> None:
    engine = tiny_engine()
    method = fmn(steps=30, lr=1e-3)
    req = request(engine, ["tench"])
    before = attention_on_concept(engine, method, req)
    info = method.erase(req)
    assert attention_on_concept(engine, method, req) < 0.8 * before
    assert info["loss_last"] < info["loss_first"]


@pytest.mark.parametrize("only_ca", [False, True])
def test_what_it_trains_and_what_it_restores(only_ca: bool) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    flags = [p.requires_grad for p in engine.pipe.unet.parameters()]
    processors = {n: type(p) for n, p in engine.pipe.unet.attn_processors.items()}
    info = fmn(only_optimize_ca=only_ca, lr=1e-3).erase(request(engine, ["tench"]))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    assert not non_finite and delta.changed
    assert all(n.startswith("unet.") for n in delta.changed)
    if only_ca:
        assert all("attn2" in n for n in delta.changed)
    else:
        assert any("attn2" not in n for n in delta.changed)
    assert info["trained_tensors"] == len(
        fmn(only_optimize_ca=only_ca).trained_names(engine.pipe.unet)
    )
    assert [p.requires_grad for p in engine.pipe.unet.parameters()] == flags
    assert {n: type(p) for n, p in engine.pipe.unet.attn_processors.items()} == processors


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(FiaBenchError, match="needs 'object' and 'style' prompts"):
        fmn(prompts={"object": "a {concept}"})
    with pytest.raises(FiaBenchError, match="steps=0"):
        fmn(steps=0)


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=fmn",
            "seeds=1",
            "n_concepts=[2]",
            "method.settings.images_per_concept=1",
            "method.settings.steps=2",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "fmn"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    assert json.loads(runs.loc[2, "info"])["trained_tensors"] > 0
