"""SPEED (Li et al., ICLR 2026: "Scalable, Precise, and Efficient Concept Erasure"): one closed
form per cross-attention value projection (``attn2.to_v``; ``params`` adds or swaps in the keys)
that maps the targets' token rows to the anchor's inside the null space of the retained concepts'
rows, with the empty prompt's states as a prior that must keep their projections
(``train_erase_null.py``, the only official file).

For each projection ``W``, with target rows ``t`` and anchor rows ``a`` (the last word-piece of
the bare concept text; every token but BOS for explicit content), ``S_tt = mean tᵀt`` and
``S_at = mean aᵀt``:

* retained rows ``r`` (the last word-piece of each retained concept, or every token of ""), in the
  few-concept regime filtered to those the raw edit ``W (S_at − S_tt)(I + S_tt)⁻¹`` moves more
  than average, and augmented with ``aug_num`` copies each perturbed along ``W``'s weakest right
  singular direction (again keeping the more moved half);
* ``P``: the projector on the eigenvectors of ``mean rᵀr`` with eigenvalue below ``threshold``
  (the retained rows' null space);
* ``K2``: the empty prompt's BOS state and the 3 k-means centres of its other states;
* ``M = (S_tt P + α I)⁻¹`` (α = ``retain_scale``) and
  ``ΔW = W (S_at − S_tt) P (I − M K2 (K2ᵀ P M K2 + λ I)⁻¹ K2ᵀ P) M``.

``ΔW`` solves ``ΔW (S_tt P + α I) + (1/λ) ΔW K2 K2ᵀ P = W (S_at − S_tt) P`` (tested), and at λ = 0
leaves the prior exactly: ``ΔW K2 = 0``. Everything runs in float64 on the CPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.schema import Choice, Dict, Flag, Int, Real, Schema, Table, Text
from fia_bench.unet_edit import block_linears, task_block

PARAMS = {"V": ("attn2.to_v",), "K": ("attn2.to_k",), "KV": ("attn2.to_k", "attn2.to_v")}
TOKEN_ROWS = ("last", "all")
RETAIN = ("concepts", "empty")  # the task's retained concepts, or the empty prompt alone


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means from ``k`` distinct rows drawn with ``generator``; returns the centres."""
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(1)
        moved = torch.stack(
            [x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)]
        )
        if torch.allclose(moved, centres, atol=1e-10):
            break
        centres = moved
    return centres


def speed_delta(
    weight: torch.Tensor,
    s_tt: torch.Tensor,
    s_at: torch.Tensor,
    null_space: torch.Tensor,
    prior: torch.Tensor,
    retain_scale: float,
    lamb: float,
) -> torch.Tensor:
    """The closed form's ΔW for one projection (all float64; ``prior`` is K2, d × m)."""
    eye = torch.eye(weight.shape[1], dtype=torch.float64)
    m = torch.linalg.inv(s_tt @ null_space + retain_scale * eye)
    inner = prior.T @ null_space @ m @ prior + lamb * torch.eye(prior.shape[1], dtype=torch.float64)
    keep_prior = eye - m @ prior @ torch.linalg.solve(inner, prior.T @ null_space)
    return weight @ (s_at - s_tt) @ null_space @ keep_prior @ m


class SPEED(Method):
    SETTINGS = Schema(
        params=Choice(*PARAMS),
        aug_num=Int(ge=0),
        threshold=Real(gt=0, null=True),
        retain_scale=Real(ge=0, null=True),
        lamb=Real(ge=0, null=True),
        filter_retain=Flag(null=True),
        multi_concept_from=Int(ge=1),
        prior_clusters=Int(ge=1),
        tasks=Dict(
            Table(
                anchor=Text(),
                token_rows=Choice(*TOKEN_ROWS),
                retain=Choice(*RETAIN),
                few=Table(
                    threshold=Real(gt=0),
                    retain_scale=Real(ge=0),
                    lamb=Real(ge=0),
                    filter_retain=Flag(),
                ),
                multi=Table(
                    threshold=Real(gt=0),
                    retain_scale=Real(ge=0),
                    lamb=Real(ge=0),
                    filter_retain=Flag(),
                ),
            ),
            null=True,
        ),
    )

    def __init__(
        self,
        params: str = "V",
        aug_num: int = 10,
        threshold: float | None = None,
        retain_scale: float | None = None,
        lamb: float | None = None,
        filter_retain: bool | None = None,
        multi_concept_from: int = 10,
        prior_clusters: int = 3,
        tasks: dict[str, Any] | None = None,
    ) -> None:
        if params not in PARAMS:
            raise unknown_choice("SPEED params", params, PARAMS, "method.settings.params")
        self.params = params
        self.aug_num = int(aug_num)
        self.threshold = threshold
        self.retain_scale = retain_scale
        self.lamb = lamb
        self.filter_retain = filter_retain
        self.multi_concept_from = int(multi_concept_from)
        self.prior_clusters = int(prior_clusters)
        self.tasks = dict(tasks or {})

    def task_settings(self, request: EraseRequest) -> dict[str, Any]:
        """The task's anchor and token rule, and the regime's (few / multi-concept) numbers;
        explicit ``threshold`` / ``retain_scale`` / ``lamb`` / ``filter_retain`` win."""
        name, data = task_block(self.tasks, request.task.kind, request.task.world, "SPEED settings")
        rows = data.get("token_rows", "last")
        if rows not in TOKEN_ROWS:
            raise unknown_choice(
                "SPEED token_rows", rows, TOKEN_ROWS, f"method.settings.tasks.{name}"
            )
        multi = len(request.targets) >= self.multi_concept_from
        regime = dict(data.get("multi" if multi else "few") or {})
        chosen = {
            "threshold": self.threshold,
            "retain_scale": self.retain_scale,
            "lamb": self.lamb,
            "filter_retain": self.filter_retain,
        }
        retain = data.get("retain", "concepts")
        if retain not in RETAIN:
            raise unknown_choice("SPEED retain", retain, RETAIN, f"method.settings.tasks.{name}")
        out = {"anchor": str(data.get("anchor", "")), "token_rows": rows, "retain": retain}
        out["regime"] = "multi" if multi else "few"
        for key_, value in chosen.items():
            value = regime.get(key_) if value is None else value
            if value is None:
                raise FiaBenchError(
                    f"method.settings.tasks.{name}.{out['regime']}.{key_} is not set (or set "
                    f"method.settings.{key_})"
                )
            out[key_] = value
        return out

    @torch.no_grad()
    def rows(self, engine: Any, texts: list[str], rule: str) -> torch.Tensor:
        """Token rows of bare texts: each text's last word-piece, or every token after BOS."""
        hidden, last = engine.rows_and_last(texts)
        hidden = hidden.cpu()
        if rule == "all":
            return hidden[:, 1:].reshape(-1, hidden.shape[-1])
        return torch.stack([hidden[i, j] for i, j in enumerate(last)])

    def retained_texts(self, request: EraseRequest, retain: str) -> list[str]:
        """The retained concepts that name no target (the code drops those), else [""]."""
        if retain == "empty":
            return [""]
        words = [re.compile(r"\b" + re.escape(t.lower()) + r"\b") for t in request.targets]
        kept = [c for c in request.retain if not any(w.search(c.lower()) for w in words)]
        return kept or [""]

    @torch.no_grad()
    def prior_rows(self, engine: Any, generator: torch.Generator) -> torch.Tensor:
        """K2 (d × (1 + clusters)): the empty prompt's BOS state and the k-means centres of the
        rest of its states."""
        hidden = engine.encode([""]).double().cpu()[0]
        centres = kmeans(hidden[1:], self.prior_clusters, generator)
        return torch.cat([hidden[:1], centres]).T

    def retain_moment(
        self, retained: torch.Tensor, weight: torch.Tensor, erase: torch.Tensor, filter_: bool
    ) -> torch.Tensor:
        """mean rᵀr over the (filtered, augmented) retained rows of one projection."""
        rows = retained
        if self.aug_num > 0 and filter_:
            moved = (rows @ erase.T).norm(dim=1)
            rows = rows[moved > moved.mean()]
        if self.aug_num > 0:
            weakest = torch.linalg.svd(weight, full_matrices=False).Vh[-1:]
            direction = weakest.T @ weakest  # P0_min
            copies = rows.repeat(self.aug_num, 1)
            noisy = copies + torch.randn(copies.shape, dtype=torch.float64) @ direction
            moved = (noisy @ erase.T).norm(dim=1)
            rows = torch.cat([rows, noisy[moved > moved.mean()]])
        return rows.T @ rows / len(rows)

    @torch.no_grad()
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"edited_matrices": 0}
        engine = request.engine
        s = self.task_settings(request)
        targets = list(request.targets)
        anchors = [s["anchor"]] * len(targets)
        t_rows = [self.rows(engine, [t], s["token_rows"]) for t in targets]
        a_rows = [self.rows(engine, [a], s["token_rows"]) for a in anchors]
        s_tt = torch.stack([t.T @ t for t in t_rows]).mean(0)
        s_at = torch.stack([a.T @ t for a, t in zip(a_rows, t_rows, strict=True)]).mean(0)
        texts = self.retained_texts(request, s["retain"])
        retained = self.rows(engine, texts, "all" if texts == [""] else "last")
        retained = retained[torch.randperm(len(retained))]
        prior = self.prior_rows(engine, torch.Generator().manual_seed(request.seed))
        eye = torch.eye(s_tt.shape[0], dtype=torch.float64)
        layers = {
            n: m
            for suffix in PARAMS[self.params]
            for n, m in block_linears(engine.pipe.unet, suffix, "SPEED").items()
        }
        null_dims = []
        for module in layers.values():
            w = module.weight.detach().double().cpu()
            raw = w @ (s_at - s_tt) @ torch.linalg.inv(eye + s_tt)
            moment = self.retain_moment(retained, w, raw, bool(s["filter_retain"]))
            eigvals, eigvecs = torch.linalg.eigh(moment)
            basis = eigvecs[:, eigvals < s["threshold"]]
            null_dims.append(int(basis.shape[1]))
            delta = speed_delta(w, s_tt, s_at, basis @ basis.T, prior, s["retain_scale"], s["lamb"])
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))
        return {
            "edited_matrices": len(layers),
            "params": self.params,
            "regime": s["regime"],
            "anchor": s["anchor"],
            "retained_texts": len(texts),
            "null_space_dims": null_dims,
        }
