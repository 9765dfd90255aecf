"""FIA — Forget-It-All (Deng et al., arXiv 2601.06163): training-free masking of FFN2 connections
(specs/methods.md §2). Only the weights of every ``…transformer_blocks.0.ff.net.2`` Linear change,
and only to zero; biases are left alone. ``layer`` moves the masking to another Linear of every
block (FFN1, cross- or self-attention K or V): the paper's layer ablation (Tables 10 and 13),
with the same saliency computed on that Linear's input (for cross-attention K/V, the text states).

Per target concept ``c`` (its own r1 / r2, ``r1_overrides`` / ``r2_overrides``):

1. Prompts: each placeholder ``p`` of the task's vocabulary gives one concept prompt (the task's
   concept templates, alternating) and one base prompt (``settings.tasks.<task>``). All prompts are
   denoised from the same initial latent (``noise_seed``) with CFG, ``inference_steps`` steps,
   stopping after the first ``saliency_steps`` = T (``engine.sample_latents(..., stop_after=T)``).
2. A forward-pre-hook on every ``ff.net.2`` takes its input ``X`` (rows = spatial positions of the
   prompt's unconditional and conditional halves, ``cfg_rows=both``, or the conditional half only)
   and adds the per-prompt saliency ``U`` to float64 running sums per (layer, step): Σ U for
   concept prompts, Σ U and Σ U² for base prompts (never the activations themselves):

   * ``paper``: Eq. 1, ``U[i,j] = |W_ij| ‖X_j‖ |⟨X_j, Y_i⟩| / (‖X_j‖ ‖Y_i‖ + ε)`` with ``Y = X Wᵀ``
     (one GEMM for all ⟨X_j, Y_i⟩);
   * ``code``: the released code's Wanda form ``U = |W_ij| ‖X̃_j‖`` on row-normalised ``X̃``; since
     ``|W|`` is the same for every prompt, only the ``C_in`` column norms are summed and
     ``S = |W| · relu(μ_c(n) − μ_b(n) − σ_b(n))``, which is exact.
3. Eq. 2: ``S_t = relu(μ_c − μ_b − σ_b)`` (population σ over base prompts), per layer and step.
4. Eq. 3: ``A = ½ mean_t S + ½ mean_t 1[S_t > τ_t]``, ``τ_t`` the k-th largest entry of ``S_t``
   with ``k`` the ``r1`` fraction of the layer; ``code`` divides ``mean_t S`` by its layer maximum
   first (``normalize_magnitude``), ``paper`` does not.
5. Eqs. 4–6: ``Q = rowwise_topk(A, r2·C_in) ∩ layer_topk(A, r2·C_out·C_in)`` (``granularity``
   row or layer keeps one of the two), and ``A > 0`` (``require_positive``). Top-k uses a stable
   sort, so ties go to the lower index on every device.
6. Eq. 8 fusion over the C targets: ``s = Σ_c 1[Q_c]``, prune ``0 < s < ⌈αC⌉``; connections that
   at least ⌈αC⌉ concepts select are "concept-agnostic" and kept. When ``⌈αC⌉ ≤ 1`` (always for
   C = 1) Eq. 8 prunes nothing (the released code returns the unedited UNet for "naked" alone);
   ``degenerate_fusion=naive`` (default, the spec's fix) then prunes every selected connection,
   ``keep_all`` reproduces the no-op.

``selection=random`` is a control the paper does not run: each layer loses as many connections as
the saliency selection would prune there, drawn uniformly with the erasure seed. An erasure that
a random mask of the same size also achieves is not the saliency's doing.

Variants (§2.5, §6): ``code`` (default) = Wanda saliency on row-normalised activations,
max-normalised Eq. 3, every placeholder, counts ``max(1, ⌊r·n⌋)``; ``paper`` = Eq. 1 with the
cosine term, Eq. 3 as printed, the 5 placeholders whose text embedding (EOS state) is closest to
the concept's ("the five most pertinent"; the paper does not say which), counts ``⌈r·n⌉``.

The saliency pass uses the run's scheduler kind (DDIM in the shipped sampler configs; the paper's
code used the pipeline default, PNDM). Base-prompt sums are reused while consecutive concepts have
the same base prompts (in ``code`` every concept does, so a job makes them once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fia_bench.activations import read_layer_inputs
from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Dict, Flag, Int, Items, Real, Schema, Table, Text
from fia_bench.unet_edit import block_linears, task_block

VARIANTS = ("code", "paper")
CFG_ROWS = ("both", "cond")
GRANULARITIES = ("both", "row", "layer")
DEGENERATE = ("naive", "keep_all")
PLACEHOLDER_CHOICES = ("similarity", "listed")
SELECTIONS = ("saliency", "random")
# Which Linear of every transformer block is masked (Tables 10/13 ablate it); the saliency is the
# same for any Linear, computed on the input its forward-pre-hook sees. FFN1 is GEGLU's projection.
LAYERS = {
    "ffn2": "ff.net.2",
    "ffn1": "ff.net.0.proj",
    "attn2.to_k": "attn2.to_k",
    "attn2.to_v": "attn2.to_v",
    "attn1.to_k": "attn1.to_k",
    "attn1.to_v": "attn1.to_v",
}
FLOAT_SLACK = 1e-9  # r·n and α·C are products of decimals: 0.7 · 10 = 7.000000000000001


# ---- small pure helpers (tested directly) ------------------------------------------------------
def top_count(fraction: float, n: int, rounding: str) -> int:
    """How many of ``n`` entries the top ``fraction`` keeps: ⌈f·n⌉ (paper) or max(1, ⌊f·n⌋)."""
    x = fraction * n
    k = math.ceil(x - FLOAT_SLACK) if rounding == "ceil" else math.floor(x + FLOAT_SLACK)
    return min(n, max(1, k))


def agnostic_threshold(alpha: float, n_concepts: int) -> int:
    """τ_ca = ⌈α·C⌉ (Eq. 8)."""
    return math.ceil(alpha * n_concepts - FLOAT_SLACK)


def fuse(counts: torch.Tensor, n_concepts: int, alpha: float, degenerate: str) -> torch.Tensor:
    """Prune mask from ``counts`` = Σ_c Mask_c (Eq. 8), with the ⌈αC⌉ ≤ 1 rule."""
    tau = agnostic_threshold(alpha, n_concepts)
    if tau <= 1:
        return counts > 0 if degenerate == "naive" else torch.zeros_like(counts, dtype=torch.bool)
    return (counts > 0) & (counts < tau)


def degenerate_rule(tau: int, degenerate: str) -> str | None:
    """How a report labels an erasure whose ⌈α·C⌉ ≤ 1 (every single-concept one): the released
    Eq. 8 prunes nothing there, so a row must say which rule made it."""
    if tau > 1:
        return None
    if degenerate == "naive":
        return f"⌈αC⌉={tau}: naive fusion, every selected connection pruned"
    return f"⌈αC⌉={tau}: Eq. 8 as released, nothing pruned"


def time_integrate(saliency: torch.Tensor, r1: float, normalize: bool, rounding: str):
    """Eq. 3 for one layer; ``saliency`` is (T, C_out, C_in). Returns A (C_out, C_in)."""
    steps = saliency.shape[0]
    flat = saliency.reshape(steps, -1)
    k = top_count(r1, flat.shape[1], rounding)
    tau = flat.topk(k, dim=1, sorted=False).values.min(dim=1).values
    frequency = (flat > tau[:, None]).float().mean(0).view_as(saliency[0])
    magnitude = saliency.mean(0)
    if normalize:
        peak = magnitude.max()
        magnitude = magnitude / peak if peak > 0 else magnitude
    return 0.5 * magnitude + 0.5 * frequency


def top_mask(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries per row (``dim=1``) or overall (``dim=None``);
    a stable sort breaks ties toward the lower index, the same on every device."""
    if dim is None:
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        return mask.index_fill_(0, order, True).view_as(scores)
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(dim, order, True)


def select(scores: torch.Tensor, r2: float, granularity: str, positive: bool, rounding: str):
    """Eqs. 4–6: row-wise top-(r2·C_in) ∩ layer-wide top-(r2·C_out·C_in)."""
    rows, cols = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if granularity in ("both", "row"):
        mask &= top_mask(scores, top_count(r2, cols, rounding), dim=1)
    if granularity in ("both", "layer"):
        mask &= top_mask(scores, top_count(r2, rows * cols, rounding), dim=None)
    if positive:
        mask &= scores > 0
    return mask


def random_masks(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Per layer, as many True entries as ``like`` has, at uniform positions drawn on the CPU
    (the same on every device) from ``seed``; layers are drawn in name order."""
    g = torch.Generator().manual_seed(int(seed))
    drawn = {}
    for name in sorted(like):
        mask = like[name]
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=g)[: int(mask.sum())]] = True
        drawn[name] = flat.view(mask.shape).to(mask.device)
    return drawn


def energy_saliency(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 1 per prompt: ``x`` (B, N, C_in) float32 → U (B, C_out, C_in)."""
    y = x @ weight.T  # (B, N, C_out), no bias
    inner = (x.transpose(1, 2) @ y).transpose(1, 2)  # (B, C_out, C_in): ⟨X_j, Y_i⟩
    x_norm = x.norm(dim=1)[:, None, :]  # (B, 1, C_in)
    y_norm = y.norm(dim=1)[:, :, None]  # (B, C_out, 1)
    return weight.abs() * x_norm * inner.abs() / (x_norm * y_norm + eps)


def wanda_norms(x: torch.Tensor) -> torch.Tensor:
    """The code's ‖X̃_j‖ per prompt: rows (tokens) L2-normalised, then column norms → (B, C_in)."""
    return F.normalize(x, dim=-1).norm(dim=1)


# ---- running sums ------------------------------------------------------------------------------
@dataclass
class RunningSums:
    """Σ U and optionally Σ U² over prompts, per saliency step, for one layer (float64)."""

    total: torch.Tensor
    squares: torch.Tensor | None
    count: int = 0

    def add(self, step: int, values: torch.Tensor) -> None:
        values = values.double()
        self.total[step] += values.sum(0)
        if self.squares is not None:
            self.squares[step] += values.square().sum(0)

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def std(self) -> torch.Tensor:
        """Population standard deviation (divide by the count), as the released code."""
        assert self.squares is not None
        mean = self.mean()
        return (self.squares / self.count - mean.square()).clamp_min(0).sqrt()


@dataclass
class Selection:
    """Per-layer counts s_ℓ of the targets that selected each connection, and what made them."""

    counts: dict[str, torch.Tensor]
    n_concepts: int
    alpha: float
    per_concept: dict[str, Any]
    saliency_prompts: int
    noise_seed: int


@dataclass(frozen=True)
class TaskPrompts:
    alpha: float
    r1: float
    r2: float
    r1_overrides: dict[str, float]
    r2_overrides: dict[str, float]
    concept_templates: tuple[str, ...]
    base_templates: tuple[str, ...]
    placeholders: tuple[str, ...]


def key(concept: str) -> str:
    return " ".join(concept.lower().split())


def check_fraction(name: str, value: float, where: str) -> float:
    value = float(value)
    if not 0 < value <= 1:
        raise FiaBenchError(f"FIA {name}={value} in {where}: must be in (0, 1]")
    return value


class FIA(Method):
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        alpha=Real(ge=0, le=1, null=True),
        r1=Real(ge=0, le=1, null=True),
        r2=Real(ge=0, le=1, null=True),
        r1_overrides=Dict(Real(ge=0, le=1), null=True),
        r2_overrides=Dict(Real(ge=0, le=1), null=True),
        saliency_steps=Int(ge=1),
        inference_steps=Int(ge=1),
        guidance_scale=Real(),
        noise_seed=Int(ge=0, null=True),
        placeholders_per_concept=Int(ge=1, null=True),
        placeholder_choice=Choice(*PLACEHOLDER_CHOICES),
        normalize_magnitude=Flag(null=True),
        cfg_rows=Choice(*CFG_ROWS),
        granularity=Choice(*GRANULARITIES),
        require_positive=Flag(),
        degenerate_fusion=Choice(*DEGENERATE),
        eps=Real(gt=0),
        batch_size=Int(ge=1, null=True),
        layer=Choice(*LAYERS),
        selection=Choice(*SELECTIONS),
        tasks=Dict(
            Table(
                alpha=Real(ge=0, le=1),
                r1=Real(ge=0, le=1),
                r2=Real(ge=0, le=1),
                r1_overrides=Dict(Real(ge=0, le=1)),
                r2_overrides=Dict(Real(ge=0, le=1)),
                concept_templates=Items(Text(), min_items=1),
                base_templates=Items(Text(), min_items=1),
                placeholders=Items(Text(), min_items=1),
            ),
            null=True,
        ),
    )

    def __init__(
        self,
        variant: str = "code",
        alpha: float | None = None,
        r1: float | None = None,
        r2: float | None = None,
        r1_overrides: dict[str, float] | None = None,
        r2_overrides: dict[str, float] | None = None,
        saliency_steps: int = 10,
        inference_steps: int = 50,
        guidance_scale: float = 7.5,
        noise_seed: int | None = 1244,
        placeholders_per_concept: int | None = None,
        placeholder_choice: str = "similarity",
        normalize_magnitude: bool | None = None,
        cfg_rows: str = "both",
        granularity: str = "both",
        require_positive: bool = True,
        degenerate_fusion: str = "naive",
        eps: float = 1e-8,
        batch_size: int | None = None,
        layer: str = "ffn2",
        selection: str = "saliency",
        tasks: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        where = "method.settings"
        for kind, value, choices in (
            ("variant", variant, VARIANTS),
            ("cfg_rows", cfg_rows, CFG_ROWS),
            ("granularity", granularity, GRANULARITIES),
            ("degenerate_fusion", degenerate_fusion, DEGENERATE),
            ("placeholder_choice", placeholder_choice, PLACEHOLDER_CHOICES),
            ("layer", layer, tuple(LAYERS)),
            ("selection", selection, SELECTIONS),
        ):
            if value not in choices:
                raise unknown_choice(f"FIA {kind}", value, choices, f"{where}.{kind}")
        if not 1 <= int(saliency_steps) <= int(inference_steps):
            raise FiaBenchError(
                f"FIA saliency_steps={saliency_steps} must be between 1 and "
                f"inference_steps={inference_steps}"
            )
        if placeholders_per_concept is not None and int(placeholders_per_concept) < 1:
            raise FiaBenchError(
                f"FIA placeholders_per_concept={placeholders_per_concept} must be at least 1"
            )
        self.variant = variant
        self.alpha = None if alpha is None else check_fraction("alpha", alpha, where)
        self.r1 = None if r1 is None else check_fraction("r1", r1, where)
        self.r2 = None if r2 is None else check_fraction("r2", r2, where)
        self.r1_overrides = self.overrides("r1_overrides", r1_overrides, where)
        self.r2_overrides = self.overrides("r2_overrides", r2_overrides, where)
        self.saliency_steps = int(saliency_steps)
        self.inference_steps = int(inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.noise_seed = noise_seed
        self.placeholders_per_concept = (
            (5 if variant == "paper" else None)
            if placeholders_per_concept is None
            else int(placeholders_per_concept)
        )
        self.placeholder_choice = placeholder_choice
        self.normalize = variant == "code" if normalize_magnitude is None else normalize_magnitude
        self.rounding = "ceil" if variant == "paper" else "floor"
        self.cfg_rows = cfg_rows
        self.granularity = granularity
        self.require_positive = bool(require_positive)
        self.degenerate_fusion = degenerate_fusion
        self.eps = float(eps)
        self.batch_size = batch_size
        self.layer = layer
        self.selection = selection
        self.tasks = tasks or {}

    @staticmethod
    def overrides(name: str, values: dict[str, float] | None, where: str) -> dict[str, float]:
        return {key(c): check_fraction(f"{name}[{c}]", v, where) for c, v in (values or {}).items()}

    # ---- settings per task and concept ---------------------------------------------------------
    def task_prompts(self, task_name: str, world: str | None = None) -> TaskPrompts:
        """A world may replace a task's prompt set (``tasks.<world>/<task>``): the mini world's
        placeholders are its own places, which its text encoder was trained on."""
        task_name, data = task_block(self.tasks, task_name, world, "FIA prompt set")
        where = f"method.settings.tasks.{task_name}"
        concept_templates = tuple(data.get("concept_templates") or ())
        base_templates = tuple(data.get("base_templates") or ())
        placeholders = tuple(str(p) for p in data.get("placeholders") or ())
        if (
            not concept_templates
            or not base_templates
            or not placeholders
            or any("{concept}" not in t or "{placeholder}" not in t for t in concept_templates)
            or any("{placeholder}" not in t or "{concept}" in t for t in base_templates)
        ):
            raise FiaBenchError(
                f"{where}: needs concept_templates with {{concept}} and {{placeholder}}, "
                "base_templates with {placeholder} only, and a non-empty placeholders list"
            )
        return TaskPrompts(
            alpha=self.alpha or check_fraction("alpha", data.get("alpha", 0.6), where),
            r1=self.r1 or check_fraction("r1", data.get("r1", 0.05), where),
            r2=self.r2 or check_fraction("r2", data.get("r2", 0.01), where),
            r1_overrides=self.overrides("r1_overrides", data.get("r1_overrides"), where)
            | self.r1_overrides,
            r2_overrides=self.overrides("r2_overrides", data.get("r2_overrides"), where)
            | self.r2_overrides,
            concept_templates=concept_templates,
            base_templates=base_templates,
            placeholders=placeholders,
        )

    def rates(self, spec: TaskPrompts, concept: str) -> tuple[float, float]:
        """(r1, r2) of one concept: the per-concept override, else the task's (or global) value."""
        return spec.r1_overrides.get(key(concept), spec.r1), spec.r2_overrides.get(
            key(concept), spec.r2
        )

    def placeholders(self, engine: Any, spec: TaskPrompts, concept: str) -> list[str]:
        """All placeholders, or the ``placeholders_per_concept`` most pertinent (closest EOS text
        embedding to the concept's, ties to the listed order) / first listed; listed order kept."""
        vocab = list(spec.placeholders)
        n = self.placeholders_per_concept
        if n is None or n >= len(vocab):
            return vocab
        if self.placeholder_choice == "listed":
            return vocab[:n]
        tokenizer = engine.pipe.tokenizer
        texts = [concept, *vocab]
        eos = (
            tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).attention_mask.sum(1)
            - 1
        )
        hidden = engine.encode(texts).float()
        rows = torch.arange(len(texts), device=hidden.device)
        pooled = hidden[rows, eos.to(hidden.device)]
        similarity = F.cosine_similarity(pooled[:1], pooled[1:]).cpu().tolist()
        chosen = sorted(range(len(vocab)), key=lambda i: (-similarity[i], i))[:n]
        return [vocab[i] for i in sorted(chosen)]

    def prompts(self, engine: Any, spec: TaskPrompts, concept: str) -> tuple[list[str], list[str]]:
        """(concept prompts, base prompts): one each per placeholder, templates alternating."""
        concept_prompts, base_prompts = [], []
        for i, place in enumerate(self.placeholders(engine, spec, concept)):
            template = spec.concept_templates[i % len(spec.concept_templates)]
            concept_prompts.append(template.format(concept=concept, placeholder=place))
            base = spec.base_templates[i % len(spec.base_templates)]
            base_prompts.append(base.format(placeholder=place))
        return concept_prompts, base_prompts

    # ---- the denoising pass ----------------------------------------------------------------------
    @staticmethod
    def layers(unet: Any, layer: str = "ffn2") -> dict[str, torch.nn.Linear]:
        """The masked Linear (``layer``: FFN2 by default) of every transformer block, by name."""
        return block_linears(unet, LAYERS[layer], "FIA")

    @torch.no_grad()
    def collect(
        self, engine: Any, prompts: list[str], squares: bool, seed: int
    ) -> dict[str, RunningSums]:
        """Running sums of the per-prompt saliency over ``prompts`` for every masked layer and each
        of the first T steps; activations are reduced in the hook and never kept."""
        unet = engine.pipe.unet
        layers = self.layers(unet, self.layer)
        steps = self.saliency_steps
        sums: dict[str, RunningSums] = {}
        for name, module in layers.items():
            shape = (module.in_features,) if self.variant == "code" else tuple(module.weight.shape)
            zeros = torch.zeros((steps, *shape), dtype=torch.float64, device=module.weight.device)
            sums[name] = RunningSums(zeros, zeros.clone() if squares else None)

        def reduce(name: str, step: int, batch: int, x: torch.Tensor) -> None:
            x = x.float().reshape(2, batch, -1, x.shape[-1])  # [uncond, cond] × prompts × tokens
            if self.cfg_rows == "both":
                x = x.transpose(0, 1).reshape(batch, -1, x.shape[-1])
            else:
                x = x[1]
            if self.variant == "code":
                values = wanda_norms(x)
            else:
                values = energy_saliency(x, layers[name].weight.float(), self.eps)
            sums[name].add(step, values)

        read_layer_inputs(
            engine,
            prompts,
            seed,
            layers,
            reduce,
            steps=self.inference_steps,
            stop_after=steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.batch_size,
        )
        for s in sums.values():
            s.count = len(prompts)
        return sums

    def saliency(
        self, concept: RunningSums, base: RunningSums, weight: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 2 for one layer: S (T, C_out, C_in) float32."""
        contrast = (concept.mean() - base.mean() - base.std()).clamp_min(0).float()
        if self.variant == "code":  # S = |W| · relu(μ_c(n) − μ_b(n) − σ_b(n)), exact
            return weight.detach().float().abs()[None] * contrast[:, None, :]
        return contrast

    def step_saliency(
        self, engine: Any, concept_prompts: list[str], base_prompts: list[str], seed: int = 1244
    ) -> dict[str, torch.Tensor]:
        """S_{ℓ,t} for every masked layer (tests and analysis; ``erase`` goes layer by layer)."""
        concept = self.collect(engine, concept_prompts, squares=False, seed=seed)
        base = self.collect(engine, base_prompts, squares=True, seed=seed)
        layers = self.layers(engine.pipe.unet, self.layer)
        return {n: self.saliency(concept[n], base[n], m.weight) for n, m in layers.items()}

    # ---- masks -----------------------------------------------------------------------------------
    def concept_masks(
        self,
        concept: dict[str, RunningSums],
        base: dict[str, RunningSums],
        layers: dict[str, torch.nn.Linear],
        r1: float,
        r2: float,
    ) -> dict[str, torch.Tensor]:
        """Q^(c) per layer (Eqs. 2–6) from one concept's and its base prompts' running sums."""
        masks = {}
        for name, module in layers.items():
            s = self.saliency(concept[name], base[name], module.weight)
            a = time_integrate(s, r1, self.normalize, self.rounding)
            masks[name] = select(a, r2, self.granularity, self.require_positive, self.rounding)
        return masks

    def select_concepts(self, request: EraseRequest) -> Selection:
        """Q^(c) of every target, summed into s_ℓ = Σ_c Mask_ℓ^(c) (Eq. 8's counts)."""
        engine = request.engine
        spec = self.task_prompts(request.task.kind, request.task.world)
        seed = request.seed if self.noise_seed is None else int(self.noise_seed)
        layers = self.layers(engine.pipe.unet, self.layer)
        targets = list(dict.fromkeys(request.targets))
        counts = {
            n: torch.zeros(m.weight.shape, dtype=torch.int32, device=m.weight.device)
            for n, m in layers.items()
        }
        base_cache: dict[tuple[str, ...], dict[str, RunningSums]] = {}
        per_concept: dict[str, Any] = {}
        passes = 0
        for concept in progress(targets, desc="fia saliency", unit="concept", leave=False):
            concept_prompts, base_prompts = self.prompts(engine, spec, concept)
            base_key = tuple(sorted(base_prompts))
            if base_key not in base_cache:  # keep one set: paper-mode sums are 8 GB on SD
                base_cache.clear()
                base_cache[base_key] = self.collect(engine, list(base_key), squares=True, seed=seed)
                passes += len(base_key)
            sums = self.collect(engine, concept_prompts, squares=False, seed=seed)
            passes += len(concept_prompts)
            r1, r2 = self.rates(spec, concept)
            masks = self.concept_masks(sums, base_cache[base_key], layers, r1, r2)
            for name, mask in masks.items():
                counts[name] += mask
            per_concept[concept] = {
                "r1": r1,
                "r2": r2,
                "prompts": len(concept_prompts),
                "selected": int(sum(int(m.sum()) for m in masks.values())),
            }
        return Selection(counts, len(targets), spec.alpha, per_concept, passes, seed)

    def fuse_selection(
        self, selection: Selection, unet: Any, alpha: float | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Eq. 8 on a selection (``alpha`` overrides the selection's): prune masks and info."""
        alpha = selection.alpha if alpha is None else alpha
        n = selection.n_concepts
        tau = agnostic_threshold(alpha, n)
        naive = tau <= 1 and self.degenerate_fusion == "naive"
        counts = selection.counts
        prune = {name: fuse(c, n, alpha, self.degenerate_fusion) for name, c in counts.items()}
        pruned = sum(int(p.sum()) for p in prune.values())
        masked_layer = sum(c.numel() for c in counts.values())
        unet_size = sum(p.numel() for p in unet.parameters())
        info = {
            "variant": self.variant,
            "concepts": n,
            "alpha": alpha,
            "agnostic_threshold": tau,
            "fusion": "naive" if naive else "eq8",
            "rule": degenerate_rule(tau, self.degenerate_fusion),
            "selected_any": sum(int((c > 0).sum()) for c in counts.values()),
            # kept as concept-agnostic: selected by at least ⌈αC⌉ concepts (none under naive)
            "agnostic_kept": 0
            if naive
            else sum(int((c >= max(tau, 1)).sum()) for c in counts.values()),
            "pruned_connections": pruned,
            "layer": self.layer,
            "layer_weights": masked_layer,
            "unet_parameters": unet_size,
            "sparsity_layer": pruned / masked_layer,
            "sparsity_unet": pruned / unet_size,
            "layers": len(counts),
            "pruned_per_layer": {name: int(p.sum()) for name, p in prune.items()},
            "per_concept": selection.per_concept,
            "saliency_prompts": selection.saliency_prompts,
            "saliency_steps": self.saliency_steps,
            "noise_seed": selection.noise_seed,
        }
        return prune, info

    def plan(self, request: EraseRequest) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The fused prune mask per masked layer and the info dict, without touching the weights."""
        prune, info = self.fuse_selection(self.select_concepts(request), request.engine.pipe.unet)
        info["selection"] = self.selection
        if self.selection == "random":
            drawn = random_masks(prune, request.seed)
            kept = sum(int((drawn[n] & prune[n]).sum()) for n in prune)
            pruned = max(info["pruned_connections"], 1)
            info["random_overlap_with_saliency"] = kept / pruned
            # a uniform draw of k of a layer's n entries meets its k salient ones k²/n times
            info["random_overlap_by_chance"] = (
                sum(int(p.sum()) ** 2 / p.numel() for p in prune.values()) / pruned
            )
            prune = drawn
        return prune, info

    @torch.no_grad()
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"pruned_connections": 0, "sparsity_layer": 0.0, "sparsity_unet": 0.0}
        prune, info = self.plan(request)
        for name, module in self.layers(request.engine.pipe.unet, self.layer).items():
            module.weight.masked_fill_(prune[name].to(module.weight.device), 0)
        return info
