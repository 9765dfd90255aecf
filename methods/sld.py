"""SLD — Safe Latent Diffusion (Schramowski et al., CVPR 2023): no weight edit. At every denoising
step a third UNet branch predicts the noise for a safety-concept text, and classifier-free
guidance is steered away from it (diffusers' ``StableDiffusionPipelineSafe``, the maintained copy
of ml-research/safe-latent-diffusion's ``SLDPipeline``).

With ε∅, εp, εS the unconditional, prompt and safety-concept predictions at step i (from 0):

* μ = min(s_S |εp − εS|, 1) where εp − εS < λ, else 0, elementwise (Eq. 6);
* γ = μ ⊙ (εS − ε∅) + s_m ν (Eqs. 4 and 7), then ν ← β_m ν + (1 − β_m) γ (Eq. 8; ν starts at 0
  and builds up during the warm-up too);
* ε̄ = ε∅ + s_g (εp − ε∅ − γ) from step ``warmup_steps`` on, plain guidance before (Eq. 3).

s_S ≤ 1 turns SLD off (the pipeline's rule): no third branch, the unedited model's images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method, Task
from fia_bench.errors import unknown_choice
from fia_bench.guidance import ClassifierFree, GuidedBatch, scaled_steps
from fia_bench.schema import Choice, Dict, Int, Real, Schema, Text
from fia_bench.unet_edit import task_block

# SafetyConfig of diffusers' stable_diffusion_safe (the paper's Hyp-Weak/-Medium/-Strong/-Max)
PRESETS: dict[str, dict[str, float]] = {
    "weak": dict(
        warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0
    ),
    "medium": dict(
        warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4
    ),
    "strong": dict(
        warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7
    ),
    "max": dict(
        warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7
    ),
}


def safety_term(
    noise_uncond: torch.Tensor,
    noise_cond: torch.Tensor,
    noise_safety: torch.Tensor,
    momentum: torch.Tensor,
    guidance_scale: float,
    threshold: float,
    momentum_scale: float,
    momentum_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, the next ν) of one step: the edit term subtracted from the guidance direction."""
    difference = noise_cond - noise_safety
    scale = torch.clamp(difference.abs() * guidance_scale, max=1.0)
    scale = torch.where(difference >= threshold, torch.zeros_like(scale), scale)
    term = scale * (noise_safety - noise_uncond) + momentum_scale * momentum
    return term, momentum_beta * momentum + (1 - momentum_beta) * term


class SafeBatch:
    """One micro-batch under SLD: [uncond, prompt, safety concept] rows and the momentum ν."""

    branches = 3

    def __init__(self, guidance: SafetyGuidance, states: torch.Tensor, warmup: int) -> None:
        self.guidance = guidance
        self.states = states
        self.warmup = warmup
        self.momentum: torch.Tensor | None = None

    def context(self, step: int) -> torch.Tensor:
        return self.states

    def noise(self, step: int, predictions: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
        noise_uncond, noise_cond, noise_safety = predictions
        direction = noise_cond - noise_uncond
        if self.momentum is None:
            self.momentum = torch.zeros_like(direction)
        g = self.guidance
        term, self.momentum = safety_term(
            noise_uncond,
            noise_cond,
            noise_safety,
            self.momentum,
            g.guidance_scale,
            g.threshold,
            g.momentum_scale,
            g.momentum_beta,
        )
        if step >= self.warmup:
            direction = direction - term
        return noise_uncond + scale * direction


@dataclass(frozen=True)
class SafetyGuidance:
    """SLD's settings, resolved; ``identity()`` is all of them."""

    safety_concept: str
    guidance_scale: float
    warmup_steps: int
    threshold: float
    momentum_scale: float
    momentum_beta: float
    warmup_reference_steps: int | None

    @property
    def enabled(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def branches(self) -> int:
        return SafeBatch.branches if self.enabled else ClassifierFree.branches

    def identity(self) -> dict[str, Any]:
        return {"kind": "sld", **asdict(self)}

    def start(
        self,
        engine: Any,
        prompts: list[str],
        uncond: torch.Tensor,
        cond: torch.Tensor,
        steps: int,
    ) -> GuidedBatch:
        if not self.enabled:
            return ClassifierFree(uncond, cond)
        safety = engine.encode([self.safety_concept]).expand_as(cond)
        warmup = scaled_steps(self.warmup_steps, steps, self.warmup_reference_steps)
        return SafeBatch(self, torch.cat([uncond, cond, safety]), warmup)


class SLD(Method):
    SETTINGS = Schema(
        preset=Choice(*PRESETS),
        guidance_scale=Real(ge=0, null=True),
        warmup_steps=Int(ge=0, null=True),
        threshold=Real(null=True),
        momentum_scale=Real(ge=0, null=True),
        momentum_beta=Real(ge=0, le=1, null=True),
        warmup_reference_steps=Int(ge=1, null=True),
        safety_concept=Text(null=True),
        safety_concepts=Dict(Text(null=True)),
    )

    def __init__(
        self,
        preset: str = "medium",
        guidance_scale: float | None = None,
        warmup_steps: int | None = None,
        threshold: float | None = None,
        momentum_scale: float | None = None,
        momentum_beta: float | None = None,
        warmup_reference_steps: int | None = 50,
        safety_concept: str | None = None,
        safety_concepts: dict[str, str | None] | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise unknown_choice("SLD preset", preset, PRESETS, "method.settings.preset")
        chosen = {
            "guidance_scale": guidance_scale,
            "warmup_steps": warmup_steps,
            "threshold": threshold,
            "momentum_scale": momentum_scale,
            "momentum_beta": momentum_beta,
        }
        self.preset = preset
        self.hyperparameters = {
            k: PRESETS[preset][k] if v is None else v for k, v in chosen.items()
        }
        self.warmup_reference_steps = warmup_reference_steps
        self.safety_concept = safety_concept
        self.safety_concepts = dict(safety_concepts or {})

    def concept(self, targets: tuple[str, ...], task: Task) -> str:
        """The safety concept: the setting, else the task's text, else the targets' names."""
        if self.safety_concept is not None:
            return self.safety_concept
        _, text = task_block(self.safety_concepts, task.kind, task.world, "SLD safety concept")
        return ", ".join(targets) if text is None else str(text)

    def sampling_guidance(self, targets: tuple[str, ...], task: Task) -> SafetyGuidance:
        h = self.hyperparameters
        return SafetyGuidance(
            safety_concept=self.concept(targets, task),
            guidance_scale=float(h["guidance_scale"]),
            warmup_steps=int(h["warmup_steps"]),
            threshold=float(h["threshold"]),
            momentum_scale=float(h["momentum_scale"]),
            momentum_beta=float(h["momentum_beta"]),
            warmup_reference_steps=self.warmup_reference_steps,
        )

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        """Nothing to edit: the record says what sampling will do."""
        return {"preset": self.preset} | self.sampling_guidance(
            request.targets, request.task
        ).identity()
