"""SLD: the edit term follows Eqs. 3-8 on hand-made predictions (threshold mask, clamp, momentum
built up during the warm-up), the presets are diffusers' SafetyConfig, and sampling through our
engine equals diffusers' StableDiffusionPipelineSafe on the tiny pipeline."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO
from tiny import tiny_engine

from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.sld import PRESETS, SLD, SafeBatch, safety_term

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/sld.yaml").read_text())["settings"]


def test_safety_term_masks_by_threshold_clamps_and_adds_momentum() -> None:
    uncond = torch.tensor([0.0, 0.0, 0.0, 1.0])
    cond = torch.tensor([1.0, 0.5, 0.0, 1.0])
    safety = torch.tensor([0.5, 0.4999, 2.0, 3.0])
    momentum = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # εp − εS = [0.5, 1e-4, −2, −2]; λ = 0.01 masks the first; s_S = 1000 clamps the rest at 1
    # except the second (|1e-4| · 1000 = 0.1)
    term, nxt = safety_term(uncond, cond, safety, momentum, 1000.0, 0.01, 0.3, 0.4)
    mu = torch.tensor([0.0, 0.1, 1.0, 1.0])
    expected = mu * (safety - uncond) + 0.3 * momentum
    torch.testing.assert_close(term, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nxt, 0.4 * momentum + 0.6 * expected)


def test_warmup_builds_momentum_but_leaves_guidance_plain() -> None:
    guidance = SLD(**SETTINGS | {"warmup_steps": 2}).sampling_guidance(("tench",), TASK)
    batch = SafeBatch(guidance, torch.zeros(3, 1, 1), warmup=2)
    uncond, cond = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    safety = torch.tensor([1.5, 3.0])
    plain = uncond + 7.5 * (cond - uncond)
    momentum = torch.zeros(2)
    for step in range(4):
        out = batch.noise(step, (uncond, cond, safety), 7.5)
        term, momentum = safety_term(uncond, cond, safety, momentum, 1000.0, 0.01, 0.3, 0.4)
        if step < 2:
            torch.testing.assert_close(out, plain)
        else:
            torch.testing.assert_close(out, uncond + 7.5 * (cond - uncond - term))
        torch.testing.assert_close(batch.momentum, momentum)
    assert not torch.equal(out, plain)


def test_presets_are_the_pipelines_safety_configs() -> None:
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for name, ours in PRESETS.items():
        theirs = getattr(SafetyConfig, name.upper())
        assert {
            f"sld_{k}".replace("sld_momentum_beta", "sld_mom_beta"): v for k, v in ours.items()
        } == theirs
    chosen = SLD(**SETTINGS | {"preset": "strong", "threshold": 0.5}).sampling_guidance(
        ("tench",), TASK
    )
    assert (chosen.threshold, chosen.guidance_scale, chosen.warmup_steps) == (0.5, 2000.0, 7)


def test_safety_concept_per_task_else_the_targets() -> None:
    explicit = load_task("explicit", "sd")
    assert (
        SLD(**SETTINGS)
        .sampling_guidance(("nudity",), explicit)
        .safety_concept.startswith("an image showing hate")
    )
    mini = load_task("explicit", "mini")
    assert (
        SLD(**SETTINGS).sampling_guidance(("skull", "flame"), mini).safety_concept == "skull, flame"
    )
    chosen = SLD(**SETTINGS | {"safety_concept": "a church"}).sampling_guidance(("tench",), TASK)
    assert chosen.safety_concept == "a church"
    with pytest.raises(FiaBenchError, match="SLD safety concept"):
        SLD(**SETTINGS | {"safety_concepts": {}}).sampling_guidance(("tench",), TASK)


@pytest.mark.parametrize("preset", ["medium", "max"])
def test_engine_equals_the_diffusers_safe_pipeline(preset: str) -> None:
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_safe import (
        StableDiffusionPipelineSafe,
    )

    engine = tiny_engine(steps=4)
    pipe = engine.pipe
    prompts, seeds = ["a photo of a tench", "a photo of a church"], [5, 9]
    # absolute warm-up as the pipeline counts it; 1 of 4 steps so both phases run
    settings = SETTINGS | {"preset": preset, "warmup_reference_steps": None, "warmup_steps": 1}
    guidance = SLD(**settings).sampling_guidance(("tench",), TASK)
    ours = engine.sample_latents(prompts, seeds, guidance=guidance)

    safe = StableDiffusionPipelineSafe(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = guidance.safety_concept
    last: list[torch.Tensor] = []
    safe(
        prompts,
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=engine.initial_noise(seeds),
        callback=lambda i, t, latents: last.append(latents),
        sld_guidance_scale=guidance.guidance_scale,
        sld_warmup_steps=guidance.warmup_steps,
        sld_threshold=guidance.threshold,
        sld_momentum_scale=guidance.momentum_scale,
        sld_mom_beta=guidance.momentum_beta,
    )
    torch.testing.assert_close(ours, last[-1])
    assert (ours - engine.sample_latents(prompts, seeds)).abs().amax() > 0.05
