"""MACE — Mass Concept Erasure (Lu et al., CVPR 2024): three stages on every cross-attention key
and value projection (``attn2.to_k`` / ``attn2.to_v``), nothing else.

1. **Closed-form refinement (CFR)**, ``src/cfr_utils.py``: each target's augmented prompts
   ("a photo of {c}", …) are paired with the same prompts naming the mapping concept. The tokens
   the two share by position (the common prefix and suffix of the token ids, then EOS and padding
   to the text length) carry the target's residue after the word; their rows ``c`` are mapped to the
   original projection of the mapping prompt's rows ``g``:
   ``min_W λ‖W − W0‖² + Σ ‖W c − W0 g‖² + s_p Σ ‖W k − W0 k‖²`` (``k``: preserved prompts' rows).
2. **One rank-r LoRA per target** on the refined weights, ``src/cfr_lora_training.py``: trained
   only to shrink the target's cross-attention maps, the loss is the sum over cross-attention
   calls of the Frobenius norm of the attention probabilities on the target's tokens (and every
   EOS/padding token, ``use_pooler``), on noised latents of the base model's images of the target.
3. **Closed-form fusion** of the LoRAs, ``src/fuse_lora_close_form.py``: ``W`` fits every
   target's LoRA-edited projection on every token row of its prompts,
   ``min_W λ‖W − W_cfr‖² + Σ_i Σ ‖W c − (W_cfr + ΔW_i) c‖² + s_p Σ ‖W k − W0 k‖²``.

Both solves run in float64 on the CPU. Where this differs from the released code (no Grounded-SAM
masks, our own prompt templates, the preservation set) is listed in docs/methods/mace.md.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Dict, Flag, Int, Items, Real, Schema, Text
from fia_bench.unet_edit import (
    block_linears,
    concept_token_mask,
    cross_attention_probabilities,
    encode_images,
    training_only,
)

CONCEPT_TYPES = ("object", "style")
PROJECTIONS = ("attn2.to_k", "attn2.to_v")


def matching_positions(
    old: list[int], new: list[int], length: int = 77
) -> tuple[list[int], list[int]]:
    """Positions the two unpadded token-id lists share (common prefix, then common suffix),
    each extended through the padding so that both keep the same length within ``length``."""
    prefix = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        prefix += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= prefix and end_new >= prefix and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old_idx = [*range(prefix), *range(end_old + 1, len(old))]
    new_idx = [*range(prefix), *range(end_new + 1, len(new))]
    shift = old_idx[-1] - new_idx[-1]
    old_idx += range(old_idx[-1] + 1, length - max(0, -shift))
    new_idx += range(new_idx[-1] + 1, length - max(0, shift))
    return old_idx, new_idx


def ridge_fit(
    anchor: torch.Tensor, lamb: float, terms: list[tuple[torch.Tensor, torch.Tensor, float]]
) -> torch.Tensor:
    """argmin_W λ‖W − anchor‖² + Σ s ‖W Cᵀ − Vᵀ‖² over ``terms`` (C rows: inputs, V rows: targets),
    from its normal equations ``W (λI + Σ s CᵀC) = λ anchor + Σ s VᵀC`` in float64."""
    a = lamb * anchor.double()
    b = lamb * torch.eye(anchor.shape[1], dtype=torch.float64)
    for inputs, targets, scale in terms:
        a = a + scale * targets.T @ inputs
        b = b + scale * inputs.T @ inputs
    try:
        return torch.linalg.solve(b, a.T).T
    except torch.linalg.LinAlgError as err:
        raise FiaBenchError(
            "MACE: the closed form is singular; raise method.settings.lamb above 0 or add "
            "preserved prompts (preserve_retain, preserve_scale)"
        ) from err


def importance_weights(n_steps: int, temperature: float = 0.05) -> np.ndarray:
    """The code's timestep density f(t) = σ(T(t − 200)) − σ(T(t − 400)), normalised."""
    t = np.arange(n_steps, dtype=np.float64)
    f = 1 / (1 + np.exp(-temperature * (t - 200))) - 1 / (1 + np.exp(-temperature * (t - 400)))
    return f / f.sum()


class MACE(Method):
    SETTINGS = Schema(
        lamb=Real(ge=0),
        mapping=Text(null=True),
        mapping_default=Text(),
        preserve_retain=Flag(),
        preserve_scale=Real(ge=0),
        concept_type=Choice(*CONCEPT_TYPES, null=True),
        templates=Dict(Items(Text(), min_items=1), null=True),
        train_lora=Flag(),
        rank=Int(ge=1),
        lr=Real(gt=0),
        train_steps=Int(ge=0),
        weight_decay=Real(ge=0),
        max_grad_norm=Real(gt=0),
        importance_sampling=Flag(),
        use_pooler=Flag(),
        images_per_concept=Int(ge=1),
        image_prompt=Dict(Text(), null=True),
        seed_base=Int(ge=0),
    )

    def __init__(
        self,
        lamb: float = 100.0,
        mapping: str | None = None,
        mapping_default: str = "",
        preserve_retain: bool = False,
        preserve_scale: float = 0.0,
        concept_type: str | None = None,
        templates: dict[str, list[str]] | None = None,
        train_lora: bool = True,
        rank: int = 1,
        lr: float = 1e-5,
        train_steps: int = 50,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        importance_sampling: bool = True,
        use_pooler: bool = True,
        images_per_concept: int = 8,
        image_prompt: dict[str, str] | None = None,
        seed_base: int = 500_000,
    ) -> None:
        if concept_type is not None and concept_type not in CONCEPT_TYPES:
            raise unknown_choice(
                "MACE concept_type", concept_type, CONCEPT_TYPES, "method.settings.concept_type"
            )
        self.templates = {k: list(v) for k, v in (templates or {}).items()}
        self.image_prompt = dict(image_prompt or {})
        extra = sorted({*self.templates, *self.image_prompt} - set(CONCEPT_TYPES))
        for kind in [*CONCEPT_TYPES, *extra]:
            if not self.templates.get(kind) or any("{}" not in t for t in self.templates[kind]):
                raise FiaBenchError(
                    f"method.settings.templates.{kind}: needs a non-empty list of templates "
                    "with {} where the concept goes"
                )
            if "{concept}" not in self.image_prompt.get(kind, ""):
                raise FiaBenchError(f"method.settings.image_prompt.{kind}: needs {{concept}}")
        if rank < 1 or train_steps < 0 or images_per_concept < 1:
            raise FiaBenchError(
                f"MACE rank={rank}, train_steps={train_steps}, images_per_concept="
                f"{images_per_concept}: need rank ≥ 1, train_steps ≥ 0, images_per_concept ≥ 1"
            )
        self.lamb = float(lamb)
        self.mapping = mapping
        self.mapping_default = mapping_default
        self.preserve_retain = preserve_retain
        self.preserve_scale = float(preserve_scale)
        self.concept_type = concept_type
        self.train_lora = train_lora
        self.rank = int(rank)
        self.lr = float(lr)
        self.train_steps = int(train_steps)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.importance_sampling = importance_sampling
        self.use_pooler = use_pooler
        self.images_per_concept = int(images_per_concept)
        self.seed_base = int(seed_base)

    # ---- prompts and token rows ----------------------------------------------------------------
    def kind(self, request: EraseRequest) -> str:
        """The template set: ``object`` or ``style``, or a world's own (``mini/object``): the mini
        world's text encoder knows only its own words."""
        kind = self.concept_type
        if kind is None:
            kind = "style" if request.task.kind == "styles" else "object"
        world_kind = f"{request.task.world}/{kind}"
        return world_kind if world_kind in self.templates else kind

    def mapped(self, request: EraseRequest, concept: str) -> str:
        if self.mapping is not None:
            return self.mapping
        return request.task.superclasses.get(concept, self.mapping_default)

    def augment(self, kind: str, concept: str) -> list[str]:
        return [t.format(concept) for t in self.templates[kind]]

    @torch.no_grad()
    def cfr_rows(
        self, engine: Any, old: list[str], new: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows c of the target's prompts, rows g of the mapping prompts), paired position by
        position over the tokens the two prompts share (``matching_positions``)."""
        tokenizer = engine.pipe.tokenizer
        old_h = engine.encode(old).double().cpu()
        new_h = engine.encode(new).double().cpu()
        c, g = [], []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            old_idx, new_idx = matching_positions(
                tokenizer(a).input_ids, tokenizer(b).input_ids, old_h.shape[1]
            )
            c.append(old_h[i, old_idx])
            g.append(new_h[i, new_idx])
        return torch.cat(c), torch.cat(g)

    @torch.no_grad()
    def all_rows(self, engine: Any, prompts: list[str]) -> torch.Tensor:
        hidden = engine.encode(prompts).double().cpu()
        return hidden.reshape(-1, hidden.shape[-1])

    def preserve_rows(self, request: EraseRequest, kind: str) -> torch.Tensor | None:
        if not (self.preserve_retain and self.preserve_scale > 0 and request.retain):
            return None
        prompts = [p for c in request.retain for p in self.augment(kind, c)]
        return self.all_rows(request.engine, prompts)

    # ---- stage 2: one LoRA per concept -----------------------------------------------------------
    def training_latents(self, request: EraseRequest, kind: str) -> dict[str, torch.Tensor]:
        """VAE latents (sampled, × scaling factor) of the base model's images of every target,
        made through the harness's image cache with seeds ``seed_base + i``."""
        n = self.images_per_concept
        seeds = [self.seed_base + i for i in range(n)]
        prompts = [
            self.image_prompt[kind].format(concept=c) for c in request.targets for _ in seeds
        ]
        images = request.base_images(prompts, seeds * len(request.targets))
        vae = request.engine.pipe.vae
        mean, std = encode_images(vae, images, max(1, request.engine.sampler.batch_size))
        latents = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor
        return {c: latents[i * n : (i + 1) * n] for i, c in enumerate(request.targets)}

    @contextmanager
    def lora(
        self, unet: Any, layers: dict[str, torch.nn.Linear]
    ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Fresh rank-r LoRA factors (down ~ N(0, 1/r), up = 0) added to every projection's output
        by forward hooks while the UNet's own parameters are frozen; undone on exit."""
        device = next(unet.parameters()).device
        factors = {}
        for name, m in layers.items():
            down = torch.randn(self.rank, m.in_features, device=device) / self.rank
            up = torch.zeros(m.out_features, self.rank, device=device)
            factors[name] = (down.requires_grad_(), up.requires_grad_())

        def add_lora(name: str):
            def hook(_m: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
                down, up = factors[name]
                return out + (args[0].float() @ down.T @ up.T).to(out.dtype)

            return hook

        handles = [m.register_forward_hook(add_lora(n)) for n, m in layers.items()]
        try:
            with training_only(unet, []):
                yield factors
        finally:
            for handle in handles:
                handle.remove()

    def train_lora_deltas(
        self,
        request: EraseRequest,
        layers: dict[str, torch.nn.Linear],
        concept: str,
        prompts: list[str],
        latents: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """ΔW = up·down per projection after ``train_steps`` AdamW steps on the attention loss."""
        from diffusers import DDPMScheduler

        engine = request.engine
        unet = engine.pipe.unet
        scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        n_train = int(scheduler.config.num_train_timesteps)
        density = importance_weights(n_train) if self.importance_sampling else None
        rng = random.Random(request.seed)
        np_rng = np.random.default_rng(request.seed)
        tokenizer = engine.pipe.tokenizer
        losses = []
        with self.lora(unet, layers) as factors, cross_attention_probabilities(unet) as probs:
            params = [p for pair in factors.values() for p in pair]
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.train_steps):
                prompt = prompts[rng.randrange(len(prompts))]
                latent = latents[rng.randrange(len(latents))][None].to(unet.device)
                if density is not None:
                    t = int(np_rng.choice(n_train, p=density))
                else:
                    t = rng.randrange(n_train)
                timestep = torch.tensor([t], device=unet.device)
                noisy = scheduler.add_noise(latent, torch.randn_like(latent), timestep)
                context = engine.encode([prompt]).to(unet.device, unet.dtype)
                positions = concept_token_mask(tokenizer, prompt, concept, self.use_pooler).to(
                    unet.device
                )
                probs.clear()
                unet(noisy.to(unet.dtype), timestep, encoder_hidden_states=context)
                loss = sum(p[..., positions].float().norm() for p in probs)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
            deltas = {n: (up @ down).detach().double().cpu() for n, (down, up) in factors.items()}
        return deltas, losses

    # ---- the three stages ------------------------------------------------------------------------
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"edited_matrices": 0}
        engine = request.engine
        unet = engine.pipe.unet
        kind = self.kind(request)
        layers = {
            n: m for suffix in PROJECTIONS for n, m in block_linears(unet, suffix, "MACE").items()
        }
        w0 = {n: m.weight.detach().double().cpu().clone() for n, m in layers.items()}
        keep = self.preserve_rows(request, kind)
        prompts = {c: self.augment(kind, c) for c in request.targets}
        rows = [
            self.cfr_rows(engine, prompts[c], self.augment(kind, self.mapped(request, c)))
            for c in request.targets
        ]
        c_all = torch.cat([c for c, _ in rows])
        g_all = torch.cat([g for _, g in rows])
        with torch.no_grad():
            for name, m in layers.items():
                terms = [(c_all, g_all @ w0[name].T, 1.0)]
                if keep is not None:
                    terms.append((keep, keep @ w0[name].T, self.preserve_scale))
                w_cfr = ridge_fit(w0[name], self.lamb, terms)
                m.weight.copy_(w_cfr.to(m.weight.device, m.weight.dtype))
        info: dict[str, Any] = {
            "edited_matrices": len(layers),
            "concept_type": kind,
            "mapping": {c: self.mapped(request, c) for c in request.targets},
            "cfr_rows": int(c_all.shape[0]),
            "preserve_rows": 0 if keep is None else int(keep.shape[0]),
        }
        if not self.train_lora:
            return info
        latents = self.training_latents(request, kind)
        deltas, losses = {}, {}
        for concept in progress(request.targets, desc="mace lora", unit="concept", leave=False):
            deltas[concept], curve = self.train_lora_deltas(
                request, layers, concept, prompts[concept], latents[concept]
            )
            losses[concept] = {"first": curve[0], "last": curve[-1]} if curve else {}
        self.fuse(layers, w0, deltas, {c: self.all_rows(engine, prompts[c]) for c in deltas}, keep)
        info["lora_loss"] = losses
        return info

    @torch.no_grad()
    def fuse(
        self,
        layers: dict[str, torch.nn.Linear],
        w0: dict[str, torch.Tensor],
        deltas: dict[str, dict[str, torch.Tensor]],
        concept_rows: dict[str, torch.Tensor],
        keep: torch.Tensor | None,
    ) -> None:
        """Stage 3 in place: every projection becomes the ridge fit of the targets' LoRA-edited
        maps on their prompts' rows, anchored at the refined weights (the current ones)."""
        for name, m in layers.items():
            w_cfr = m.weight.detach().double().cpu()
            terms = [
                (rows, rows @ (w_cfr + deltas[c][name]).T, 1.0) for c, rows in concept_rows.items()
            ]
            if keep is not None:
                terms.append((keep, keep @ w0[name].T, self.preserve_scale))
            fused = ridge_fit(w_cfr, self.lamb, terms)
            m.weight.copy_(fused.to(m.weight.device, m.weight.dtype))
