"""Inference-time methods through the harness: a guided job's images never share the unedited
model's cache keys (nor another setting's), the engine keeps its batching under a guidance that
runs more UNet branches, and the weights stay as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import REPO
from tiny import tiny_engine

from fia_bench.cache import Cache
from fia_bench.erasures import Job
from fia_bench.models import LoadedModel, weights_fingerprint
from fia_bench.stages import Stages
from fia_bench.tasks import load_task
from methods.sld import SLD

TASK = load_task("objects", "tiny")
SLD_SETTINGS = yaml.safe_load((REPO / "conf/method/sld.yaml").read_text())["settings"]
PROMPTS = ["a photo of a tench", "a photo of a church", "an image of a tench"]
SEEDS = [3, 7, 11]


def tiny_stages(tmp_path: Path) -> Stages:
    engine = tiny_engine(steps=4)
    fingerprint = weights_fingerprint(engine.pipe)
    model = LoadedModel("tiny_random", "tiny", engine.pipe, 16, {}, fingerprint)
    return Stages(model, engine, Cache(tmp_path / "cache"), TASK, "fp32")


def job(method: str, **settings) -> Job:
    full = SLD_SETTINGS | settings if method == "sld" else {}
    return Job(method, full, 1, 0, TASK.concepts[:1], TASK.concepts[1:])


def images(stages: Stages, erased, prompts=PROMPTS, seeds=SEEDS) -> tuple[list[str], list]:
    keys = stages.images.keys(erased, prompts, seeds)
    stages.images.generate(erased, prompts, seeds, keys, "test")
    return keys, [np.asarray(stages.images.path(k).open("rb").read()) for k in keys]


def test_guided_images_have_their_own_keys_even_when_they_equal_the_unedited(
    tmp_path: Path,
) -> None:
    stages = tiny_stages(tmp_path)
    base_keys, base = images(stages, stages.erase(job("none")))
    # s_S = 0 turns SLD off: the unedited model's images, made again under their own keys
    off = stages.erase(job("sld", guidance_scale=0.0))
    made = stages.counts.images_generated
    off_keys, off_images = images(stages, off)
    assert stages.counts.images_generated == made + len(PROMPTS)
    assert not set(off_keys) & set(base_keys)
    assert all(np.array_equal(a, b) for a, b in zip(base, off_images, strict=True))
    # every setting is in the key; the same settings give the same keys
    medium = stages.images.keys(stages.erase(job("sld")), PROMPTS, SEEDS)
    assert stages.images.keys(stages.erase(job("sld")), PROMPTS, SEEDS) == medium
    for change in (
        {"threshold": 0.02},
        {"guidance_scale": 999.0},
        {"warmup_steps": 3},
        {"momentum_scale": 0.1},
        {"momentum_beta": 0.5},
        {"warmup_reference_steps": None},
        {"safety_concept": "a church"},
        {"preset": "strong"},
    ):
        changed = stages.images.keys(stages.erase(job("sld", **change)), PROMPTS, SEEDS)
        assert not set(changed) & set(medium), change
        assert not set(changed) & set(base_keys), change


def test_weights_are_untouched_and_nothing_is_stored_as_an_edit(tmp_path: Path) -> None:
    stages = tiny_stages(tmp_path)
    before = state_bytes(stages.model.pipe)
    erased = stages.erase(job("sld"))
    images(stages, erased)
    assert erased.meta["changed"] == {} and erased.weights_id == stages.images.base_weights_id
    assert state_bytes(stages.model.pipe) == before


def state_bytes(pipe) -> dict[str, bytes]:
    return {
        f"{part}.{name}": tensor.cpu().numpy().tobytes()
        for part in ("unet", "text_encoder", "vae")
        for name, tensor in getattr(pipe, part).state_dict().items()
    }


def test_a_three_branch_guidance_keeps_images_independent_of_their_batch() -> None:
    """Up to float rounding, which convolutions do by batch shape and SLD's s_S = 1000 amplifies
    (plain guidance: 3e-5 here, SLD 3e-4 on latents of unit scale)."""
    engine = tiny_engine(steps=4, batch_size=4)
    guidance = SLD(**SLD_SETTINGS | {"warmup_steps": 0}).sampling_guidance(TASK.concepts[:1], TASK)
    assert guidance.branches == 3
    together = engine.sample_latents(PROMPTS, SEEDS, guidance=guidance)
    rows = zip(PROMPTS, SEEDS, strict=True)
    alone = [engine.sample_latents([p], [s], guidance=guidance) for p, s in rows]
    torch.testing.assert_close(together, torch.cat(alone), atol=2e-3, rtol=0)
    plain = engine.sample_latents(PROMPTS, SEEDS)
    assert (together - plain).abs().amax() > 0.05
