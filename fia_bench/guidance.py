"""Sampling-time changes: what an inference-time method (SLD, SAFREE) hands the engine instead of
a weight edit.

A ``Guidance`` is made once per job from the method's settings and targets; it holds no tensors,
so the same object serves every batch and its ``identity()`` (JSON: the resolved settings and
texts) can enter image cache keys before anything is sampled. For each micro-batch the engine
calls ``start`` with the prompts' text states and gets a ``GuidedBatch``: at every denoising step
it gives the text states the UNet runs on (``branches`` rows per image, stacked branch by branch)
and turns the UNet's per-branch predictions into the one noise prediction the scheduler steps
with. Plain classifier-free guidance is the ``GuidedBatch`` every unguided batch uses, so an
inference-time method that falls back to it makes exactly the unedited model's images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from fia_bench.engine import Engine


class GuidedBatch(Protocol):
    branches: int  # UNet rows per image at every step

    def context(self, step: int) -> torch.Tensor:
        """Text states for the UNet at ``step``: (branches · batch, tokens, width)."""
        ...

    def noise(self, step: int, predictions: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
        """The guided noise prediction from the ``branches`` predictions (batch rows each)."""
        ...


@runtime_checkable
class Guidance(Protocol):
    branches: int  # UNet rows per image its batches run (the engine sizes micro-batches by it)

    def identity(self) -> dict[str, Any]:
        """Everything that decides what it changes (kind, resolved settings, texts), JSON-able:
        part of every image key made with it."""
        ...

    def start(
        self,
        engine: Engine,
        prompts: list[str],
        uncond: torch.Tensor,
        cond: torch.Tensor,
        steps: int,
    ) -> GuidedBatch:
        """One micro-batch's sampling state over ``steps`` denoising steps; ``uncond`` and
        ``cond`` are the engine's text states of the negative (or empty) prompts and of
        ``prompts``."""
        ...


class ClassifierFree:
    """Classifier-free guidance: the unconditional and conditional branches in one UNet batch."""

    branches = 2

    def __init__(self, uncond: torch.Tensor, cond: torch.Tensor) -> None:
        self.states = torch.cat([uncond, cond])

    def context(self, step: int) -> torch.Tensor:
        return self.states

    def noise(self, step: int, predictions: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
        noise_uncond, noise_cond = predictions
        return noise_uncond + scale * (noise_cond - noise_uncond)


def scaled_steps(count: int, steps: int, reference: int | None) -> int:
    """A step count given for ``reference``-step sampling (the papers' 50) at ``steps`` steps,
    rounded; ``reference`` None keeps it as given."""
    return count if reference is None else round(count * steps / reference)
