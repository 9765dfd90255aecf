"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024): one closed-form solve per
cross-attention key/value projection.

For every ``attn2.to_k`` / ``attn2.to_v`` weight ``W0`` it solves

    min_W  s_e Σ_erase ‖W c_i − W0 g_i‖² + s_p Σ_preserve ‖W c_j − W0 c_j‖² + λ ‖W − W0‖²_F

whose normal equations ``W B = A`` have
``A = λ W0 + s_e Σ (W0 g_i) c_iᵀ + s_p Σ (W0 c_j) c_jᵀ`` and
``B = λ I + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ``.
Which text-encoder token rows enter as ``c`` is where the versions differ:

* ``variant=paper`` (default; what published UCE numbers used): rows from the last word-piece
  through EOS and padding, paired row by row with the guide's; preserve terms use all 77 rows of
  each preserved text, and the empty prompt is always preserved;
  ``preserve_scale`` defaults to max(0.1, 1 / number of preserve texts).
* ``variant=lasttoken`` (the 2025 rewrite): one row per prompt, the last word-piece; preserve only
  the retained concepts; ``preserve_scale`` defaults to 1.

Unset ``concept_type``, ``guide`` and ``preserve_retain`` follow the official runs for the task's
kind (docs/methods/uce.md): the styles task is an art run (guide "art", the other artists
preserved), every other task an object / nudity run (guide " " or "", nothing preserved but the
paper-era empty prompt). ``expand_prompts`` keeps each bare concept and adds its five templates.

The solve runs in float64 (the released code inverts B in float32) and the result is cast back.
"""

from __future__ import annotations

from typing import Any

import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import unknown_choice
from fia_bench.schema import Choice, Flag, Real, Schema, Text

VARIANTS = ("paper", "lasttoken")
EXPANSIONS = {
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"],
    "art": ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"],
}


def task_kind(task_name: str) -> str:
    """The official runs' ``concept_type`` for a task: the styles task is UCE's art runs, every
    other task (objects, explicit content) its object / unsafe runs."""
    return "art" if task_name == "styles" else "object"


class UCE(Method):
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        lamb=Real(ge=0),
        erase_scale=Real(ge=0),
        preserve_scale=Real(ge=0, null=True),
        guide=Text(null=True),
        preserve_retain=Flag(null=True),
        expand_prompts=Flag(),
        concept_type=Choice(*EXPANSIONS, null=True),
    )

    def __init__(
        self,
        variant: str = "paper",
        lamb: float = 0.5,
        erase_scale: float = 1.0,
        preserve_scale: float | None = None,
        guide: str | None = None,
        preserve_retain: bool | None = None,
        expand_prompts: bool = False,
        concept_type: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_choice("UCE variant", variant, VARIANTS, "method.settings.variant")
        if concept_type is not None and concept_type not in EXPANSIONS:
            raise unknown_choice(
                "UCE concept_type", concept_type, EXPANSIONS, "method.settings.concept_type"
            )
        self.variant = variant
        self.lamb = lamb
        self.erase_scale = erase_scale
        self.preserve_scale = preserve_scale
        self.guide = guide
        self.preserve_retain = preserve_retain
        self.expand_prompts = expand_prompts
        self.concept_type = concept_type

    def kind(self, task_name: str) -> str:
        return self.concept_type or task_kind(task_name)

    def guide_for(self, kind: str) -> str:
        """The official default guide: "art" for art (the paper's art runs and the 2025 code);
        otherwise " " (paper, towards the unconditional) or "" (2025 code)."""
        if self.guide is not None:
            return self.guide
        if kind == "art":
            return "art"
        return " " if self.variant == "paper" else ""

    def keeps_retain(self, kind: str) -> bool:
        """Official default: art runs preserve the other artists; object and nudity runs preserve
        nothing but the paper-era empty prompt."""
        return kind == "art" if self.preserve_retain is None else self.preserve_retain

    def texts(self, targets: tuple[str, ...], kind: str) -> tuple[list[str], list[str]]:
        """(erase texts, guide texts), aligned: each concept, then (``expand_prompts``) its five
        templates. The paper-era code pairs every text with the bare guide; the 2025 code puts
        the guide into the same templates."""
        templates = EXPANSIONS[kind] if self.expand_prompts else []
        guide = self.guide_for(kind)
        erase, guides = [], []
        for concept in targets:
            erase += [concept, *(t.format(concept) for t in templates)]
            if self.variant == "lasttoken":
                guides += [guide, *(t.format(guide) for t in templates)]
            else:
                guides += [guide] * (1 + len(templates))
        return erase, guides

    def preserve_texts(self, retain: tuple[str, ...], kind: str) -> list[str]:
        """Never expanded (neither official version templates its preserve list)."""
        kept = list(retain) if self.keeps_retain(kind) else []
        return ["", *kept] if self.variant == "paper" else kept

    @torch.no_grad()
    def token_rows(self, engine: Any, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """``Engine.rows_and_last`` on the CPU, where UCE solves."""
        hidden, last = engine.rows_and_last(prompts)
        return hidden.cpu(), last

    def pairs(
        self, engine: Any, targets: tuple[str, ...], kind: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(erase rows, guide rows), aligned row by row."""
        erase_texts, guides = self.texts(targets, kind)
        erase_h, erase_last = self.token_rows(engine, erase_texts)
        guide_h, guide_last = self.token_rows(engine, guides)
        c, g = [], []
        for i in range(len(erase_texts)):
            fe, fg = erase_last[i], guide_last[i]
            if self.variant == "lasttoken":
                c.append(erase_h[i, fe : fe + 1])
                g.append(guide_h[i, fg : fg + 1])
            else:
                length = erase_h.shape[1] - max(fe, fg)
                c.append(erase_h[i, fe : fe + length])
                g.append(guide_h[i, fg : fg + length])
        return torch.cat(c), torch.cat(g)

    def preserve_rows(
        self, engine: Any, retain: tuple[str, ...], kind: str
    ) -> tuple[torch.Tensor, int]:
        texts = self.preserve_texts(retain, kind)
        if not texts:
            return torch.empty(
                0, engine.pipe.text_encoder.config.hidden_size, dtype=torch.float64
            ), 0
        hidden, last = self.token_rows(engine, texts)
        if self.variant == "paper":
            return hidden.reshape(-1, hidden.shape[-1]), len(texts)
        return torch.stack([hidden[i, f] for i, f in enumerate(last)]), len(texts)

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"edited_matrices": 0}
        engine = request.engine
        kind = self.kind(request.task.kind)
        c_erase, c_guide = self.pairs(engine, request.targets, kind)
        c_keep, n_keep_texts = self.preserve_rows(engine, request.retain, kind)
        s_p = self.preserve_scale
        if s_p is None:
            s_p = max(0.1, 1.0 / n_keep_texts) if self.variant == "paper" and n_keep_texts else 1.0
        edited = 0
        for name, module in engine.pipe.unet.named_modules():
            if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
                continue
            solve_in_place(
                module.weight, c_erase, c_guide, c_keep, self.lamb, self.erase_scale, s_p
            )
            edited += 1
        return {
            "edited_matrices": edited,
            "erase_rows": int(c_erase.shape[0]),
            "preserve_rows": int(c_keep.shape[0]),
            "preserve_scale": s_p,
            "preserve_retain": self.keeps_retain(kind),
            "concept_type": kind,
            "guide": self.guide_for(kind),
            "variant": self.variant,
        }


def normal_equations(
    w0: torch.Tensor,
    c_erase: torch.Tensor,
    c_guide: torch.Tensor,
    c_keep: torch.Tensor,
    lamb: float,
    s_e: float,
    s_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of ``W B = A`` in float64; rows of the ``c`` matrices are token vectors."""
    w0 = w0.double().cpu()
    eye = torch.eye(w0.shape[1], dtype=torch.float64)
    a = lamb * w0 + s_e * (c_guide @ w0.T).T @ c_erase + s_p * (c_keep @ w0.T).T @ c_keep
    b = lamb * eye + s_e * c_erase.T @ c_erase + s_p * c_keep.T @ c_keep
    return a, b


@torch.no_grad()
def solve_in_place(
    weight: torch.Tensor,
    c_erase: torch.Tensor,
    c_guide: torch.Tensor,
    c_keep: torch.Tensor,
    lamb: float,
    s_e: float,
    s_p: float,
) -> None:
    a, b = normal_equations(weight, c_erase, c_guide, c_keep, lamb, s_e, s_p)
    weight.copy_(torch.linalg.solve(b, a.T).T.to(weight.device, weight.dtype))
