"""ConceptPrune (Chavhan, Li & Hospedales, arXiv 2405.19237): training-free pruning of the FFN2
connections that a concept's prompts drive harder than neutral prompts ("skilled neurons").
FIA's nearest relative, so FIA-vs-pruning comparisons isolate what FIA adds (Eqs. 1-3, Eq. 8).

Per target concept (the released code, ``wanda/wanda.py`` and ``wanda/save_union_over_time.py``;
the paper's text could not be read, so there is no ``variant`` switch):

1. Prompt pairs: for each placeholder ``p`` one concept prompt and one base prompt (objects
   "a {c} in a {p}" / "a {p}", styles "a {p} in the style of {c}" / "a photo of a {p}",
   explicit "a photo of a {c} {p}" / "a photo of a {p}"), all denoised from one initial latent
   (``noise_seed``, 0 as released) with CFG 7.5 on a 50-step schedule.
2. A forward-pre-hook on every masked Linear (``ff.net.2`` by default) L2-normalises each input
   row (token, unconditional and conditional halves alike) and adds the squared entries to a
   float64 sum per (layer, step); ``n_t = sqrt(Σ rows x̃²)`` is the column norm of all prompts'
   rows stacked, which is what the code accumulates, independent of batching.
3. Wanda score ``S_t = |W| · n_t`` (per connection) for the concept and the base prompts.
   Skilled at step t: among the row-wise top ``⌊skill_ratio · C_in⌋`` of the concept's ``S_t``
   and ``S_t(concept) > S_t(base)``. Ties go to the lower index (stable sort).
4. Union over the first ``timesteps`` steps: a connection is pruned when it is skilled at more
   than ``select_ratio · timesteps`` of them (``select_ratio`` 0: at any step).
5. Several concepts: the union of their masks (``wanda/multi_concept_union.py``).

The selected weights are set to zero; biases and every other tensor are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fia_bench.activations import read_layer_inputs
from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Dict, Int, Items, Real, Schema, Table, Text
from fia_bench.unet_edit import block_linears, task_block

# The code's hook_module choices: unet (FFN2), unet-ffn-1 (GEGLU's projection), attn_key, attn_val.
LAYERS = {
    "ffn2": "ff.net.2",
    "ffn1": "ff.net.0.proj",
    "attn2.to_k": "attn2.to_k",
    "attn2.to_v": "attn2.to_v",
}


@dataclass(frozen=True)
class PromptSet:
    skill_ratio: float
    concept_prompt: str
    base_prompt: str
    placeholders: tuple[str, ...]

    def pairs(self, concept: str) -> tuple[list[str], list[str]]:
        """(concept prompts, base prompts), one of each per placeholder, in listed order."""
        return (
            [self.concept_prompt.format(concept=concept, placeholder=p) for p in self.placeholders],
            [self.base_prompt.format(placeholder=p) for p in self.placeholders],
        )


def row_top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of every row; a stable sort sends ties to the lower index."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return mask.scatter_(1, order, True)


def skilled_counts(
    weight: torch.Tensor, concept_norms: torch.Tensor, base_norms: torch.Tensor, skill_ratio: float
) -> torch.Tensor:
    """How many of the T steps find each connection skilled; norms are (T, C_in)."""
    magnitude = weight.detach().double().abs()
    k = int(skill_ratio * magnitude.shape[1])  # the code's int(ratio · C_in): floor
    counts = torch.zeros(magnitude.shape, dtype=torch.int32, device=magnitude.device)
    for concept_n, base_n in zip(concept_norms, base_norms, strict=True):
        concept_score = magnitude * concept_n[None, :]
        skilled = row_top_mask(concept_score, k) & (concept_score > magnitude * base_n[None, :])
        counts += skilled
    return counts


class ConceptPrune(Method):
    SETTINGS = Schema(
        skill_ratio=Real(gt=0, le=1, null=True),
        timesteps=Int(ge=1),
        select_ratio=Real(ge=0, lt=1),
        inference_steps=Int(ge=1),
        guidance_scale=Real(),
        noise_seed=Int(ge=0, null=True),
        layer=Choice(*LAYERS),
        batch_size=Int(ge=1, null=True),
        tasks=Dict(
            Table(
                skill_ratio=Real(gt=0, le=1),
                concept_prompt=Text(),
                base_prompt=Text(),
                placeholders=Items(Text(), min_items=1),
            ),
            null=True,
        ),
    )

    def __init__(
        self,
        skill_ratio: float | None = None,
        timesteps: int = 10,
        select_ratio: float = 0.0,
        inference_steps: int = 50,
        guidance_scale: float = 7.5,
        noise_seed: int | None = 0,
        layer: str = "ffn2",
        batch_size: int | None = None,
        tasks: dict[str, Any] | None = None,
    ) -> None:
        if layer not in LAYERS:
            raise unknown_choice("ConceptPrune layer", layer, LAYERS, "method.settings.layer")
        if skill_ratio is not None and not 0 < skill_ratio <= 1:
            raise FiaBenchError(f"ConceptPrune skill_ratio={skill_ratio}: must be in (0, 1]")
        if not 1 <= timesteps <= inference_steps:
            raise FiaBenchError(
                f"ConceptPrune timesteps={timesteps}: must be in [1, inference_steps="
                f"{inference_steps}]"
            )
        if not 0 <= select_ratio < 1:
            raise FiaBenchError(f"ConceptPrune select_ratio={select_ratio}: must be in [0, 1)")
        self.skill_ratio = skill_ratio
        self.timesteps = timesteps
        self.select_ratio = select_ratio
        self.inference_steps = inference_steps
        self.guidance_scale = guidance_scale
        self.noise_seed = noise_seed
        self.layer = layer
        self.batch_size = batch_size
        self.tasks = dict(tasks or {})

    def prompt_set(self, task_name: str, world: str | None = None) -> PromptSet:
        """The task's prompt pairs; a world may replace them (``tasks.<world>/<task>``): the mini
        world's text encoder knows only its own words."""
        task_name, data = task_block(self.tasks, task_name, world, "ConceptPrune prompt set")
        concept, base = str(data.get("concept_prompt", "")), str(data.get("base_prompt", ""))
        placeholders = tuple(str(p) for p in data.get("placeholders") or ())
        if (
            "{concept}" not in concept
            or "{placeholder}" not in concept
            or "{placeholder}" not in base
            or "{concept}" in base
            or not placeholders
        ):
            raise FiaBenchError(
                f"method.settings.tasks.{task_name}: needs concept_prompt with {{concept}} and "
                "{placeholder}, base_prompt with {placeholder} only, and a non-empty "
                "placeholders list"
            )
        ratio = float(self.skill_ratio or data.get("skill_ratio", 0.02))
        return PromptSet(ratio, concept, base, placeholders)

    def layers(self, unet: Any) -> dict[str, torch.nn.Linear]:
        return block_linears(unet, LAYERS[self.layer], "ConceptPrune")

    @torch.no_grad()
    def column_norms(self, engine: Any, prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
        """Per masked layer, (T, C_in) float64: the column norms of the row-normalised inputs of
        all ``prompts`` stacked, at each of the first T steps."""
        unet = engine.pipe.unet
        layers = self.layers(unet)
        steps = self.timesteps
        squares = {
            n: torch.zeros(steps, m.in_features, dtype=torch.float64, device=m.weight.device)
            for n, m in layers.items()
        }

        def accumulate(name: str, step: int, _batch: int, x: torch.Tensor) -> None:
            rows = F.normalize(x.double().reshape(-1, x.shape[-1]), dim=1)
            squares[name][step] += rows.square().sum(0)

        read_layer_inputs(
            engine,
            prompts,
            seed,
            layers,
            accumulate,
            steps=self.inference_steps,
            stop_after=steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.batch_size,
        )
        return {n: s.sqrt() for n, s in squares.items()}

    def concept_mask(
        self,
        layers: dict[str, torch.nn.Linear],
        concept: dict[str, torch.Tensor],
        base: dict[str, torch.Tensor],
        skill_ratio: float,
    ) -> dict[str, torch.Tensor]:
        """One concept's prune mask per layer: skilled at more than select_ratio·T steps."""
        return {
            n: skilled_counts(m.weight, concept[n], base[n], skill_ratio)
            > self.select_ratio * self.timesteps
            for n, m in layers.items()
        }

    def plan(self, request: EraseRequest) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The union of the targets' masks per layer and the info dict; weights untouched."""
        engine = request.engine
        spec = self.prompt_set(request.task.kind, request.task.world)
        seed = request.seed if self.noise_seed is None else int(self.noise_seed)
        layers = self.layers(engine.pipe.unet)
        prune = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        base_norms: dict[str, torch.Tensor] | None = None
        per_concept: dict[str, int] = {}
        targets = list(dict.fromkeys(request.targets))
        for concept in progress(targets, desc="conceptprune", unit="concept", leave=False):
            concept_prompts, base_prompts = spec.pairs(concept)
            if base_norms is None:  # every concept of a task shares its base prompts
                base_norms = self.column_norms(engine, base_prompts, seed)
            norms = self.column_norms(engine, concept_prompts, seed)
            mask = self.concept_mask(layers, norms, base_norms, spec.skill_ratio)
            per_concept[concept] = sum(int(m.sum()) for m in mask.values())
            for name, m in mask.items():
                prune[name] |= m
        pruned = sum(int(m.sum()) for m in prune.values())
        masked = sum(m.numel() for m in prune.values())
        info = {
            "layer": self.layer,
            "skill_ratio": spec.skill_ratio,
            "timesteps": self.timesteps,
            "select_ratio": self.select_ratio,
            "pruned_connections": pruned,
            "layer_weights": masked,
            "sparsity_layer": pruned / masked,
            "sparsity_unet": pruned / sum(p.numel() for p in engine.pipe.unet.parameters()),
            "selected_per_concept": per_concept,
            "noise_seed": seed,
        }
        return prune, info

    @torch.no_grad()
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"pruned_connections": 0, "sparsity_layer": 0.0, "sparsity_unet": 0.0}
        prune, info = self.plan(request)
        for name, module in self.layers(request.engine.pipe.unet).items():
            module.weight.masked_fill_(prune[name], 0)
        return info
