"""SAFREE (Yoon et al., ICLR 2025): no weight edit. Prompt tokens that pull the prompt toward a
toxic concept subspace are projected out of it before sampling, for as many early steps as a
self-validating filter decides (``models/modified_stable_diffusion_pipeline.py`` of
jaehong31/SAFREE, run as ``scripts/run_nudity.sh``: ``--safree -svf -lra``).

Per prompt, with C the pooled text embeddings of the toxic concept keywords (P_C the projector on
their span) and m_i the pooled embedding of the prompt with its i-th real token replaced by token
id 0:

* distances d_i = ‖(I − P_C) m_i‖; token i is a trigger where d_i ≥ (1 + α) · mean_{j≠i} d_j
  (removing it moves the prompt away from the concept);
* every token state e is projected as (I − P_C) P_M e, P_M the projector on the span of the m_i,
  and the triggers' states are replaced by theirs (BOS, EOS and padding are kept);
* self-validating filter: β = 1 − the mean cosine similarity of the projected and original states
  of BOS, the real tokens and EOS; the projected prompt is used at steps i ≤
  round(T · sigmoid(2k(10β − t))) and the original after (T = ``upper_step``; t, k per task);
* the code's negative prompt: the keywords joined by ", " replace the empty prompt.

The latent re-attention (``-lra``) is not implemented: as released it registers Fourier filters
on the UNet's up-blocks without a filter mode, so they change nothing (docs/methods/safree.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method, Task
from fia_bench.guidance import ClassifierFree, GuidedBatch, scaled_steps
from fia_bench.schema import Dict, Flag, Int, Items, Real, Schema, Table, Text
from fia_bench.unet_edit import task_block

MASK_TOKEN_ID = 0  # what the code writes over a token to mask it (CLIP's "!")


def span_projector(rows: torch.Tensor) -> torch.Tensor:
    """Projector (d × d) onto the span of ``rows`` (n × d): Eᵀ (E Eᵀ)⁺ E, as the code's
    ``projection_matrix``."""
    return rows.T @ torch.linalg.pinv(rows @ rows.T) @ rows


def trigger_tokens(masked: torch.Tensor, toxic: torch.Tensor, alpha: float) -> torch.Tensor:
    """Which of the prompt's real tokens are triggers, given the pooled embeddings of the prompt
    with each one masked (n × d) and the toxic projector. With one token the leave-one-out mean
    is undefined (nan) and the token counts as a trigger, as in the code."""
    distance = (masked - masked @ toxic).norm(dim=1)  # P_C is symmetric
    others = (distance.sum() - distance) / (len(distance) - 1)
    return ~(distance < (1 + alpha) * others)


def projected_states(states: torch.Tensor, masked: torch.Tensor, toxic: torch.Tensor):
    """Every token state mapped into the masked prompts' span, then out of the toxic one."""
    inside = states @ span_projector(masked)
    return inside - inside @ toxic


def filter_steps(beta: float, upper: int, midpoint: float, steepness: float) -> int:
    """The last step that uses the projected prompt (the code's ``f_beta``, sigmoid form)."""
    return round(upper / (1 + math.exp(-2.0 * steepness * (10 * beta - midpoint))))


class SafreeBatch:
    """One micro-batch: each row's projected prompt up to its last filtered step."""

    branches = 2

    def __init__(
        self, uncond: torch.Tensor, cond: torch.Tensor, safe: torch.Tensor, last: torch.Tensor
    ) -> None:
        self.uncond, self.cond, self.safe, self.last = uncond, cond, safe, last

    def context(self, step: int) -> torch.Tensor:
        projected = (step <= self.last).view(-1, 1, 1)
        return torch.cat([self.uncond, torch.where(projected, self.safe, self.cond)])

    noise = ClassifierFree.noise  # only the conditional states change, not the guidance


@dataclass(frozen=True)
class SafreeGuidance:
    """SAFREE's settings, resolved; ``identity()`` is all of them."""

    concepts: tuple[str, ...]
    alpha: float
    self_validation: bool
    upper_step: int
    midpoint: float
    steepness: float
    negative_prompt: bool
    reference_steps: int | None

    branches = SafreeBatch.branches

    def identity(self) -> dict[str, Any]:
        return {"kind": "safree", **asdict(self)}

    @torch.no_grad()
    def pooled(self, engine: Any, ids: torch.Tensor) -> torch.Tensor:
        return engine.pipe.text_encoder(ids.to(engine.device)).pooler_output.double()

    @torch.no_grad()
    def start(
        self,
        engine: Any,
        prompts: list[str],
        uncond: torch.Tensor,
        cond: torch.Tensor,
        steps: int,
    ) -> GuidedBatch:
        toxic = span_projector(self.pooled(engine, engine.tokenize(list(self.concepts)).input_ids))
        upper = scaled_steps(self.upper_step, steps, self.reference_steps)
        safe, last = [], []
        for prompt, states in zip(prompts, cond, strict=True):
            tokens = engine.tokenize([prompt])
            ids, real = tokens.input_ids[0], int(tokens.attention_mask[0].sum()) - 2
            if real == 0:  # the empty prompt: nothing to project
                safe.append(states)
                last.append(-1)
                continue
            masked_ids = ids[: real + 2].repeat(real, 1)
            masked_ids[range(real), range(1, real + 1)] = MASK_TOKEN_ID
            masked = self.pooled(engine, masked_ids)
            original = states.double()
            projected = projected_states(original, masked, toxic)
            swap = torch.zeros(len(original), dtype=torch.bool, device=original.device)
            swap[1 : real + 1] = trigger_tokens(masked, toxic, self.alpha)
            safe.append(torch.where(swap[:, None], projected, original).to(states.dtype))
            if self.self_validation:
                active = slice(0, real + 2)
                similarity = torch.cosine_similarity(projected[active], original[active], dim=1)
                beta = 1 - float(similarity.mean())
                last.append(filter_steps(beta, upper, self.midpoint, self.steepness))
            else:
                last.append(steps)
        if self.negative_prompt:
            uncond = engine.encode([", ".join(self.concepts)] * len(prompts))
        return SafreeBatch(uncond, cond, torch.stack(safe), torch.tensor(last, device=cond.device))


class SAFREE(Method):
    SETTINGS = Schema(
        alpha=Real(ge=0),
        self_validation=Flag(),
        upper_step=Int(ge=0),
        negative_prompt=Flag(),
        reference_steps=Int(ge=1, null=True),
        concepts=Items(Text(), min_items=1, null=True),
        tasks=Dict(
            Table(
                concepts=Items(Text(), min_items=1, null=True),
                midpoint=Real(),
                steepness=Real(gt=0),
            )
        ),
    )

    def __init__(
        self,
        alpha: float = 0.01,
        self_validation: bool = True,
        upper_step: int = 10,
        negative_prompt: bool = True,
        reference_steps: int | None = 50,
        concepts: list[str] | None = None,
        tasks: dict[str, Any] | None = None,
    ) -> None:
        self.alpha = float(alpha)
        self.self_validation = self_validation
        self.upper_step = int(upper_step)
        self.negative_prompt = negative_prompt
        self.reference_steps = reference_steps
        self.concepts = None if concepts is None else tuple(concepts)
        self.tasks = dict(tasks or {})

    def sampling_guidance(self, targets: tuple[str, ...], task: Task) -> SafreeGuidance:
        """The toxic keywords: the setting, else the task's list, else the targets' names."""
        _, block = task_block(self.tasks, task.kind, task.world, "SAFREE settings")
        listed = block.get("concepts")
        concepts = self.concepts or (tuple(listed) if listed else tuple(targets))
        return SafreeGuidance(
            concepts=concepts,
            alpha=self.alpha,
            self_validation=self.self_validation,
            upper_step=self.upper_step,
            midpoint=float(block["midpoint"]),
            steepness=float(block["steepness"]),
            negative_prompt=self.negative_prompt,
            reference_steps=self.reference_steps,
        )

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        """Nothing to edit: the record says what sampling will do."""
        return self.sampling_guidance(request.targets, request.task).identity()
