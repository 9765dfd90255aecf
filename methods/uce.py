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
  each retained concept, and the empty prompt is always preserved;
  ``preserve_scale`` defaults to max(0.1, 1 / number of preserve texts).
* ``variant=lasttoken`` (the 2025 rewrite): one row per prompt, the last word-piece; preserve only
  the retained concepts; ``preserve_scale`` defaults to 1.

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


class UCE(Method):
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        lamb=Real(ge=0),
        erase_scale=Real(ge=0),
        preserve_scale=Real(ge=0, null=True),
        guide=Text(null=True),
        preserve_retain=Flag(),
        expand_prompts=Flag(),
        concept_type=Choice(*EXPANSIONS),
    )

    def __init__(
        self,
        variant: str = "paper",
        lamb: float = 0.5,
        erase_scale: float = 1.0,
        preserve_scale: float | None = None,
        guide: str | None = None,
        preserve_retain: bool = True,
        expand_prompts: bool = False,
        concept_type: str = "object",
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_choice("UCE variant", variant, VARIANTS, "method.settings.variant")
        if concept_type not in EXPANSIONS:
            raise unknown_choice(
                "UCE concept_type", concept_type, EXPANSIONS, "method.settings.concept_type"
            )
        self.variant = variant
        self.lamb = lamb
        self.erase_scale = erase_scale
        self.preserve_scale = preserve_scale
        self.guide = (" " if variant == "paper" else "") if guide is None else guide
        self.preserve_retain = preserve_retain
        self.expand_prompts = expand_prompts
        self.concept_type = concept_type

    def expand(self, concepts: tuple[str, ...]) -> list[str]:
        if not self.expand_prompts:
            return list(concepts)
        return [t.format(c) for c in concepts for t in EXPANSIONS[self.concept_type]]

    @torch.no_grad()
    def token_rows(self, engine: Any, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states (prompts × 77 × d) and each prompt's last word-piece index."""
        mask = engine.tokenize(prompts).attention_mask
        return engine.encode(prompts).double().cpu(), (mask.sum(1) - 2).tolist()

    def pairs(self, engine: Any, targets: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(erase rows, guide rows), aligned row by row."""
        erase_texts = self.expand(targets)
        guides = [self.guide] * len(erase_texts)
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

    def preserve_rows(self, engine: Any, retain: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        texts = self.expand(retain) if self.preserve_retain else []
        if self.variant == "paper":
            texts = ["", *texts]
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
        c_erase, c_guide = self.pairs(engine, request.targets)
        c_keep, n_keep_texts = self.preserve_rows(engine, request.retain)
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
