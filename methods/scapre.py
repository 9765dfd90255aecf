"""ScaPre — Scalable-Precise concept unlearning (Deng et al., ICLR 2026): a closed-form edit of
every cross-attention ``attn2.to_k`` / ``attn2.to_v`` weight (specs/methods.md §3).

``variant=code`` (default) is what the released ``edit/erase_scale.py`` computes (§3.3), per
weight ``W0`` (``d_out × D``):

a. entropy factor ``μ``: mean normalised Shannon entropy of each row's response to noisy copies
   of the concept embeddings;
b. spectral term ``R = U diag(μ (1 − sigmoid((σ − med σ)/T)^p)) Uᵀ`` (``enable_ased``);
c. Informax soft mask: per concept and row, the 2×2 mutual information between "response above
   the row's median" and "target vs empty-prompt input", z-scored across rows, then
   ``sigmoid(z / 0.7)^p``; ``m_max`` is the max over concepts (``use_mi_softmask``);
d. UCE accumulation ``V = η Σ_k diag(m'_k) Σ_tok (W0 g) xᵀ`` with a second, fresh mask draw
   ``m'``, and ``S = η Σ x xᵀ``;
e. one solve per output row ``i``::

       [(λ+μ) I + R + CCᵀ + S + η m_max,i Π_C (+ s_p KᵀK)] w_i = (λ+μ) w0_i + V_i (+ s_p KᵀK w0_i)

   (the ``K`` term only with the harness option ``preserve_retain``). The row matrices differ
   only by ``η m_max,i Π_C``, so all rows are solved at once: one Cholesky of the shared part and
   a Woodbury correction through the rank-m factor of ``Π_C`` (``solver=cholesky`` does one
   batched Cholesky per row instead, as the released code does row by row);
f. the row-wise "Bures proximal" blend of each row's norm and direction toward ``w0_i``.

``variant=erase`` is the released ``edit/erase.py`` (the README's Imagenette-10 script): the same
text rows, entropy factor ``e`` and per-concept masks ``m_k``, one full-matrix solve
``W (λI + CCᵀ + S) = λ W0 + V`` (λ, not λ+μ; no Π_C term, no R, no Bures step), optionally minus
the ``--svd`` residual ``η_res (W0 C_res) C_resᵀ``, then the entropy rollback
``W = diag(α) W_new + diag(1 − α) W0`` with ``α_i = α_min + (1 − α_min) e_i``.

``variant=paper`` is the paper's form as the spec reconstructs it (§3.2, §6): ``α = MI / max MI``
on raw MI, ``B = diag(α)`` on whole rows, ``R`` with the ``(1 − sigmoid(σ)) σ`` gate, the
Sylvester equation ``B W + W A = Y`` with ``A = λI + S + R``, solved exactly through the
eigendecomposition of ``A``, then a full-matrix step ``geodesic_step`` of the way along the Bures
geodesic from ``W*W*ᵀ`` to ``W0W0ᵀ``, mapped back to weights by orthogonal Procrustes.

All noise comes from a CPU ``torch.Generator`` seeded from ``(request.seed, module name)``, so an
edit is reproducible and does not depend on the order the matrices are visited. Solves run in
float64 on the weight's device; the result is cast back. ``erase`` returns the distribution of the
Informax MI and of the masks (the spec suspects both collapse to constants).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.schema import Choice, Dict, Flag, Int, Items, Real, Schema, Text

log = logging.getLogger(__name__)

VARIANTS = ("code", "paper", "erase")
SOLVERS = ("woodbury", "cholesky")
PAPER_TARGETS = ("zero", "guide")
LN2 = math.log(2.0)
MI_HIST_BINS = 10


# ---- text side -----------------------------------------------------------------------------------
@dataclass
class TextRows:
    """Token features shared by every weight (rows are D-dimensional, float64)."""

    last: torch.Tensor  # m × D: each concept text's last word-piece, c_k
    context: torch.Tensor  # T × D: last word-piece, EOS and padding of every concept text, x
    guide_rows: torch.Tensor  # L × D: the guide's states from its own last token on
    guide_pos: torch.Tensor  # T: the row of ``guide_rows`` paired with each context row
    owner: torch.Tensor  # T: index of the concept text each context row belongs to
    neutral: torch.Tensor  # D: the empty prompt's state at token 1, e_∅
    keep: torch.Tensor  # P × D: last word-pieces of preserved texts (usually P = 0)

    @property
    def guide(self) -> torch.Tensor:
        """T × D: the guide row g paired with each context row x."""
        return self.guide_rows[self.guide_pos]

    @property
    def guide_last(self) -> torch.Tensor:
        """m × D: the guide row paired with each concept's last word-piece c_k."""
        return self.guide_rows[0].expand(self.last.shape[0], -1)


def text_rows(
    engine: Any, texts: list[str], guide: str, neutral: str, keep_texts: list[str]
) -> TextRows:
    """UCE's token alignment: concept rows from the last word-piece to the end, paired row by row
    with the guide's rows from the guide's own last token (BOS for " ")."""
    hidden, last = engine.rows_and_last(texts)
    guide_h, guide_last = engine.rows_and_last([guide])
    g, fg = guide_h[0], guide_last[0]
    n_tok = hidden.shape[1]
    ctx, pos, owner = [], [], []
    for k, fe in enumerate(last):
        length = n_tok - max(fe, fg)
        ctx.append(hidden[k, fe : fe + length])
        pos.append(torch.arange(length))
        owner.append(torch.full((length,), k, dtype=torch.long))
    neutral_h = engine.encode([neutral]).double()[0, 1]
    dim = hidden.shape[-1]
    if keep_texts:
        keep_h, keep_last = engine.rows_and_last(keep_texts)
        keep = torch.stack([keep_h[j, f] for j, f in enumerate(keep_last)])
    else:
        keep = hidden.new_zeros(0, dim)
    return TextRows(
        last=torch.stack([hidden[k, f] for k, f in enumerate(last)]),
        context=torch.cat(ctx),
        guide_rows=g[fg:],
        guide_pos=torch.cat(pos).to(hidden.device),
        owner=torch.cat(owner).to(hidden.device),
        neutral=neutral_h,
        keep=keep,
    )


def matrix_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from the run seed and the module name (visit order is irrelevant)."""
    digest = hashlib.sha256(f"scapre:{int(seed)}:{name}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def noise(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(like.device)


# ---- statistics of the base weight ---------------------------------------------------------------
def entropy_factor(
    w0: torch.Tensor, last: torch.Tensor, samples: int, sigma: float, bins: int, gen
) -> tuple[torch.Tensor, float]:
    """(e, μ): e_i = 1 − H_i / ln B of row i's min-max-normalised, B-bin histogram of its responses
    to ``samples`` noisy copies of every concept; μ = mean_i (1 − e_i)."""
    m, dim = last.shape
    copies = last.repeat_interleave(samples, 0) + sigma * noise(gen, (m * samples, dim), w0)
    acts = w0 @ copies.T  # d × N
    lo = acts.amin(1, keepdim=True)
    hi = acts.amax(1, keepdim=True)
    unit = (acts - lo) / (hi - lo + 1e-8)
    idx = (unit * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(acts.shape[0], bins, dtype=torch.float64, device=w0.device)
    counts.scatter_add_(1, idx, torch.ones_like(unit))
    p = counts / acts.shape[1]
    entropy = -torch.xlogy(p, p).sum(1)
    e = 1.0 - entropy / math.log(bins)
    return e, float((1.0 - e).mean())


def informax_mi(
    w0: torch.Tensor,
    last: torch.Tensor,
    neutral: torch.Tensor,
    samples: int,
    sigma: float,
    gen,
    eps: float = 1e-8,
) -> torch.Tensor:
    """MI (d × m, nats) between z = 1[response > the row's lower median] and the label y (target
    concept k vs the empty prompt), from ``samples`` noisy positives and negatives per concept."""
    m, dim = last.shape
    xi = noise(gen, (m, 2 * samples, dim), w0)
    centres = torch.cat(
        [last[:, None].expand(m, samples, dim), neutral.expand(m, samples, dim)], dim=1
    )
    acts = (centres + sigma * xi) @ w0.T  # m × 2n × d
    median = acts.median(dim=1, keepdim=True).values  # lower median, as torch.median
    z = (acts > median).double()
    total = 2 * samples
    p11 = z[:, :samples].sum(1) / total  # z=1, y=1
    p10 = z[:, samples:].sum(1) / total  # z=1, y=0
    p01 = 0.5 - p11
    p00 = 0.5 - p10
    pz1 = p11 + p10
    pz0 = 1.0 - pz1
    mi = sum(
        pj * torch.log((pj + eps) / (pz * 0.5 + eps))
        for pj, pz in ((p11, pz1), (p10, pz1), (p01, pz0), (p00, pz0))
    )
    return mi.T.contiguous()


def code_mask(mi: torch.Tensor, power: float, temperature: float) -> torch.Tensor:
    """The released code's soft mask: z-score each concept's MI across rows, sigmoid(z/T)^p."""
    z = (mi - mi.mean(0, keepdim=True)) / (mi.std(0, keepdim=True) + 1e-8)
    return torch.sigmoid(z / temperature) ** power


def paper_alpha(mi: torch.Tensor) -> torch.Tensor:
    """The paper's row weight: α_i = max_k MI_ik / max_j max_k MI_jk (0 where all MI are 0)."""
    best = mi.amax(1)
    top = best.max()
    return best / top if top > 0 else torch.zeros_like(best)


@dataclass
class Shared:
    """Products of the text rows that every weight reuses (computed once per edit)."""

    cct: torch.Tensor  # C Cᵀ = Σ_k c_k c_kᵀ
    xtx: torch.Tensor  # Σ_tok x xᵀ over every context row
    ktk: torch.Tensor  # Σ_j k_j k_jᵀ over preserved rows
    proj_factor: torch.Tensor  # F (D × m) with Π_C = F Fᵀ
    basis: torch.Tensor  # U of C = U diag(σ) Vᵀ
    singular: torch.Tensor  # σ


def projector_factor(last: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = Π_C = C (CᵀC + 1e-8 I)⁻¹ Cᵀ exactly, from the m × m eigendecomposition of
    CᵀC (C = [c_1 … c_m], rows of ``last``)."""
    ev, v = torch.linalg.eigh(last @ last.T)
    return (last.T @ v) / (ev.clamp_min(0) + 1e-8).sqrt()


def concept_projector(last: torch.Tensor) -> torch.Tensor:
    """Π_C = C (CᵀC + 1e-8 I)⁻¹ Cᵀ, dense (D × D)."""
    c = last.T
    gram = c.T @ c + 1e-8 * torch.eye(c.shape[1], dtype=c.dtype, device=c.device)
    return c @ torch.linalg.solve(gram, c.T)


def shared_products(tx: TextRows) -> Shared:
    u, s, _ = torch.linalg.svd(tx.last.T, full_matrices=False)
    return Shared(
        cct=tx.last.T @ tx.last,
        xtx=tx.context.T @ tx.context,
        ktk=tx.keep.T @ tx.keep,
        proj_factor=projector_factor(tx.last),
        basis=u,
        singular=s,
    )


def code_spectral(shared: Shared, mu: float, temperature: float, power: float) -> torch.Tensor:
    """R = U diag(μ (1 − sigmoid((σ − median σ)/T)^p)) Uᵀ from the SVD of C (D × m)."""
    s, u = shared.singular, shared.basis
    gate = torch.sigmoid((s - s.median()) / temperature) ** power
    return (u * (mu * (1.0 - gate))) @ u.T


def residual_directions(shared: Shared, last: torch.Tensor, temperature: float, power: float):
    """erase.py's ``--svd`` step: C_res = (I − U diag(w) Uᵀ) C with the spectral gate
    w = sigmoid((σ − median σ)/T)^p from the SVD of C (D × m; returned as m × D rows)."""
    s, u = shared.singular, shared.basis
    gate = torch.sigmoid((s - s.median()) / temperature) ** power
    return last - ((last @ u) * gate) @ u.T


def paper_spectral(shared: Shared) -> torch.Tensor:
    """R = U diag((1 − sigmoid(σ)) σ) Uᵀ (the paper's Eq. 4 gate)."""
    s, u = shared.singular, shared.basis
    return (u * ((1.0 - torch.sigmoid(s)) * s)) @ u.T


# ---- the code variant's per-row system -----------------------------------------------------------
@dataclass
class RowSystem:
    """Row i solves ``(base + scale_i Π_C) w_i = rhs_i`` with ``Π_C = F Fᵀ`` (base symmetric)."""

    base: torch.Tensor  # D × D
    proj_factor: torch.Tensor  # F, D × r
    scale: torch.Tensor  # d
    rhs: torch.Tensor  # d × D
    w0: torch.Tensor  # d × D
    lam_prime: float
    mu: float

    @property
    def proj(self) -> torch.Tensor:
        return self.proj_factor @ self.proj_factor.T

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """Each row's left-hand side ``M_i w_i`` (rows of the result)."""
        f = self.proj_factor
        return w @ self.base + self.scale[:, None] * ((w @ f) @ f.T)

    def residual(self, w: torch.Tensor) -> float:
        """max_i ‖M_i w_i − b_i‖ / max_i ‖b_i‖."""
        err = (self.apply(w) - self.rhs).norm(dim=1).max()
        return float(err / self.rhs.norm(dim=1).max().clamp_min(1e-300))


def solve_woodbury(system: RowSystem) -> torch.Tensor:
    """All rows at once: one Cholesky of ``base`` (A), then Woodbury through Π_C = F Fᵀ, with
    ``(I/s + FᵀA⁻¹F)⁻¹ = E diag(s / (1 + s λ)) Eᵀ`` from one r × r eigendecomposition."""
    chol = torch.linalg.cholesky(system.base)
    z = torch.cholesky_solve(system.rhs.T, chol).T  # d × D, rows A⁻¹ b_i
    f = system.proj_factor
    if f.shape[1] == 0:
        return z
    h = torch.cholesky_solve(f, chol)  # A⁻¹ F
    k = f.T @ h
    lam, e = torch.linalg.eigh((k + k.T) / 2)
    s = system.scale[:, None]
    coef = s / (1.0 + s * lam.clamp_min(0)[None, :])
    return z - ((z @ (f @ e)) * coef) @ (h @ e).T


def solve_cholesky(system: RowSystem, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """One Cholesky per row, batched in chunks (the released code's solve, without the loop)."""
    dim = system.base.shape[0]
    chunk = max(1, chunk_bytes // (8 * dim * dim))
    proj = system.proj
    out = []
    for start in range(0, system.rhs.shape[0], chunk):
        s = system.scale[start : start + chunk, None, None]
        mats = system.base + s * proj
        chol = torch.linalg.cholesky(mats)
        out.append(torch.cholesky_solve(system.rhs[start : start + chunk, :, None], chol)[..., 0])
    return torch.cat(out)


def bures_rows(a: torch.Tensor, w0: torch.Tensor, lam_prime: float, mu: float, iters: int):
    """The code's row-wise "Bures proximal" blend of each row's norm and direction toward w0_i,
    run max(1, iters) times as the released code does (0 does not switch it off)."""
    tiny = torch.finfo(a.dtype).tiny
    na = a.norm(dim=1, keepdim=True)
    ua = a / na.clamp_min(tiny)
    r0 = w0.norm(dim=1, keepdim=True)
    u0 = w0 / r0.clamp_min(tiny)
    u, r = ua, na
    for _ in range(max(1, iters)):
        kappa = (u * u0).sum(1, keepdim=True).clamp_min(0.0)
        r = (lam_prime * na + mu * r0 * kappa) / (lam_prime + mu)
        blend = lam_prime * na * ua + mu * r0 * kappa * u0
        u = blend / blend.norm(dim=1, keepdim=True).clamp_min(tiny)
    return r * u


# ---- the paper variant ---------------------------------------------------------------------------
def solve_sylvester(
    alpha: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """W with ``diag(α) W + W A = Y`` (A symmetric positive definite, α ≥ 0): row i is
    ``y_i E diag(1/(λ + α_i)) Eᵀ`` with ``A = E diag(λ) Eᵀ`` (pass ``eig`` to reuse it)."""
    lam, e = eig if eig is not None else torch.linalg.eigh((a + a.T) / 2)
    return ((y @ e) / (lam[None, :] + alpha[:, None])) @ e.T


def bures_geodesic(w_star: torch.Tensor, w0: torch.Tensor, t: float) -> torch.Tensor:
    """A factor of the point a fraction ``t`` along the Bures geodesic from W*W*ᵀ to W0W0ᵀ, the one
    Procrustes-aligned with W*: ``(1 − t) W* + t W0 Q`` with Q = polar(W0ᵀ W*)."""
    if t == 0:
        return w_star
    if not bool(w_star.any()):  # every Q is optimal; take Q = I (the path is then t W0)
        return t * w0
    u, _, vh = torch.linalg.svd(w0.T @ w_star)
    return (1.0 - t) * w_star + t * (w0 @ (u @ vh))


def bures_distance(w: torch.Tensor, v: torch.Tensor) -> float:
    """Bures distance between WWᵀ and VVᵀ: sqrt(‖W‖² + ‖V‖² − 2 ‖WᵀV‖_*)."""
    sq = w.pow(2).sum() + v.pow(2).sum() - 2 * torch.linalg.svdvals(w.T @ v).sum()
    return float(sq.clamp_min(0).sqrt())


# ---- logging helpers -----------------------------------------------------------------------------
def summary(values: torch.Tensor) -> dict[str, float]:
    v = values.flatten().double()
    if v.numel() == 0:
        return {}
    return {
        "min": float(v.min()),
        "mean": float(v.mean()),
        "max": float(v.max()),
        "std": float(v.std(unbiased=False)),
    }


def mi_summary(mi: list[torch.Tensor]) -> dict[str, Any]:
    """The pooled MI over every (matrix, row, concept), a histogram on [0, ln 2] and how many
    (matrix, concept) columns are constant across rows (then the z-score, hence the mask, is)."""
    flat = torch.cat([x.flatten() for x in mi]).cpu()
    edges = torch.linspace(0.0, LN2, MI_HIST_BINS + 1, dtype=torch.float64)
    hist = torch.histc(flat.clamp(0.0, LN2), bins=MI_HIST_BINS, min=0.0, max=LN2)
    constant = sum(int((x.std(0) < 1e-6).sum()) for x in mi)
    columns = sum(x.shape[1] for x in mi)
    return {
        **summary(flat),
        "frac_ln2": float((flat > LN2 - 1e-6).double().mean()),
        "hist_edges": [round(float(x), 6) for x in edges],
        "hist_counts": [int(x) for x in hist],
        "constant_columns": constant,
        "columns": columns,
    }


# ---- the plugin ----------------------------------------------------------------------------------
class ScaPre(Method):
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        lamb=Real(ge=0),
        erase_scale=Real(ge=0),
        guide=Text(),
        neutral_prompt=Text(),
        noise_sigma=Real(ge=0),
        entropy_samples=Int(ge=1),
        entropy_bins=Int(ge=1),
        use_mi_softmask=Flag(),
        mi_samples=Int(ge=1),
        mi_power=Real(),
        mi_temperature=Real(gt=0),
        enable_ased=Flag(),
        sigma_temperature=Real(gt=0),
        sigma_power=Real(),
        bures_iters=Int(ge=0),
        solver=Choice(*SOLVERS),
        geodesic_step=Real(ge=0, le=1),
        paper_target=Choice(*PAPER_TARGETS),
        paper_anchor=Flag(),
        preserve_retain=Flag(),
        preserve_scale=Real(ge=0),
        add_prompts=Flag(),
        concept_type=Text(),
        templates=Dict(Items(Text(), min_items=1), null=True),
        alpha_min=Real(ge=0, le=1),
        svd_residual=Flag(),
        residual_scale=Real(ge=0, null=True),
    )

    def __init__(
        self,
        variant: str = "code",
        lamb: float = 0.5,
        erase_scale: float = 3.0,
        guide: str = " ",
        neutral_prompt: str = "",
        noise_sigma: float = 0.01,
        entropy_samples: int = 20,
        entropy_bins: int = 20,
        use_mi_softmask: bool = True,
        mi_samples: int = 5,
        mi_power: float = 5.0,
        mi_temperature: float = 0.7,
        enable_ased: bool = False,
        sigma_temperature: float = 1.0,
        sigma_power: float = 1.0,
        bures_iters: int = 1,
        solver: str = "woodbury",
        alpha_min: float = 0.1,
        svd_residual: bool = False,
        residual_scale: float | None = None,
        geodesic_step: float = 0.5,
        paper_target: str = "zero",
        paper_anchor: bool = True,
        preserve_retain: bool = False,
        preserve_scale: float = 1.0,
        add_prompts: bool = False,
        concept_type: str = "object",
        templates: dict[str, list[str]] | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_choice("ScaPre variant", variant, VARIANTS, "method.settings.variant")
        if solver not in SOLVERS:
            raise unknown_choice("ScaPre solver", solver, SOLVERS, "method.settings.solver")
        if paper_target not in PAPER_TARGETS:
            raise unknown_choice(
                "ScaPre paper_target", paper_target, PAPER_TARGETS, "method.settings.paper_target"
            )
        templates = dict(templates or {})
        if add_prompts and concept_type not in templates:
            raise unknown_choice(
                "ScaPre concept_type", concept_type, templates, "method.settings.concept_type"
            )
        for kind, items in templates.items():
            if any("{concept}" not in t for t in items):
                raise FiaBenchError(
                    f"method.settings.templates.{kind}: every template needs {{concept}}"
                )
        if entropy_samples < 1 or entropy_bins < 2 or mi_samples < 1:
            raise FiaBenchError(
                "method.settings: entropy_samples >= 1, entropy_bins >= 2, mi_samples >= 1"
            )
        if not 0.0 <= geodesic_step <= 1.0:
            raise FiaBenchError("method.settings.geodesic_step must lie in [0, 1]")
        if not 0.0 <= alpha_min <= 1.0:
            raise FiaBenchError(f"method.settings.alpha_min must lie in [0, 1], got {alpha_min}")
        if bures_iters < 0:
            raise FiaBenchError(f"method.settings.bures_iters must be >= 0, got {bures_iters}")
        self.variant = variant
        self.lamb = float(lamb)
        self.erase_scale = float(erase_scale)
        self.guide = guide
        self.neutral_prompt = neutral_prompt
        self.noise_sigma = float(noise_sigma)
        self.entropy_samples = int(entropy_samples)
        self.entropy_bins = int(entropy_bins)
        self.use_mi_softmask = bool(use_mi_softmask)
        self.mi_samples = int(mi_samples)
        self.mi_power = float(mi_power)
        self.mi_temperature = float(mi_temperature)
        self.enable_ased = bool(enable_ased)
        self.sigma_temperature = float(sigma_temperature)
        self.sigma_power = float(sigma_power)
        self.bures_iters = int(bures_iters)
        self.solver = solver
        self.alpha_min = float(alpha_min)
        self.svd_residual = bool(svd_residual)
        self.residual_scale = erase_scale if residual_scale is None else float(residual_scale)
        self.geodesic_step = float(geodesic_step)
        self.paper_target = paper_target
        self.paper_anchor = bool(paper_anchor)
        self.preserve_retain = bool(preserve_retain)
        self.preserve_scale = float(preserve_scale)
        self.add_prompts = bool(add_prompts)
        self.concept_type = concept_type
        self.templates = templates

    # -- inputs --
    def concept_texts(self, concepts: tuple[str, ...]) -> list[str]:
        """Each concept string itself, plus its templates with ``add_prompts``."""
        texts = list(concepts)
        if self.add_prompts:
            texts += [
                t.format(concept=c) for c in concepts for t in self.templates[self.concept_type]
            ]
        return texts

    def rows(self, engine: Any, targets: tuple[str, ...], retain: tuple[str, ...]) -> TextRows:
        keep = list(retain) if self.preserve_retain else []
        return text_rows(engine, self.concept_texts(targets), self.guide, self.neutral_prompt, keep)

    @staticmethod
    def kv_modules(engine: Any) -> list[tuple[str, torch.nn.Module]]:
        return [
            (name, module)
            for name, module in engine.pipe.unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v"))
        ]

    # -- per weight --
    def code_system(
        self, w0: torch.Tensor, tx: TextRows, shared: Shared, gen: torch.Generator
    ) -> tuple[RowSystem, dict[str, torch.Tensor]]:
        """Steps a–d of §3.3: the per-row system of step e, and the logged MI / masks."""
        eta, s_p = self.erase_scale, self.preserve_scale
        eye = torch.eye(w0.shape[1], dtype=w0.dtype, device=w0.device)
        _, mu = entropy_factor(
            w0, tx.last, self.entropy_samples, self.noise_sigma, self.entropy_bins, gen
        )
        spectral = (
            code_spectral(shared, mu, self.sigma_temperature, self.sigma_power)
            if self.enable_ased
            else 0.0
        )
        draw = (w0, tx.last, tx.neutral, self.mi_samples, self.noise_sigma, gen)
        mi = informax_mi(*draw)  # the aggregate mask's draw
        mi_fresh = informax_mi(*draw)  # the accumulation's own, fresh draw
        if self.use_mi_softmask:
            mask_max = code_mask(mi, self.mi_power, self.mi_temperature).amax(1)
            mask_k = code_mask(mi_fresh, self.mi_power, self.mi_temperature)
        else:
            mask_max = torch.ones(w0.shape[0], dtype=w0.dtype, device=w0.device)
            mask_k = torch.ones_like(mi_fresh)
        # d × T: m'_k,i · w0_iᵀ g_tok for every context row (the guide's rows are shared)
        targets = (w0 @ tx.guide_rows.T)[:, tx.guide_pos] * mask_k[:, tx.owner]
        lam_prime = self.lamb + mu
        base = lam_prime * eye + spectral + shared.cct + eta * shared.xtx + s_p * shared.ktk
        rhs = lam_prime * w0 + eta * targets @ tx.context + s_p * w0 @ shared.ktk
        system = RowSystem(
            base=(base + base.T) / 2,
            proj_factor=shared.proj_factor,
            scale=eta * mask_max,
            rhs=rhs,
            w0=w0,
            lam_prime=lam_prime,
            mu=mu,
        )
        return system, {"mi": mi, "mi_fresh": mi_fresh, "mask_max": mask_max, "mask_k": mask_k}

    def edit_code(
        self, w0: torch.Tensor, tx: TextRows, shared: Shared, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        system, logged = self.code_system(w0, tx, shared, gen)
        solved = solve_woodbury(system) if self.solver == "woodbury" else solve_cholesky(system)
        logged["residual"] = system.residual(solved)
        logged["mu"] = system.mu
        return bures_rows(solved, w0, system.lam_prime, system.mu, self.bures_iters), logged

    def edit_erase(
        self, w0: torch.Tensor, tx: TextRows, shared: Shared, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """erase.py (the README's Imagenette script): one full-matrix solve
        ``W (λI + CCᵀ + S) = λ W0 + V`` (no μ, no Π_C, no R, no Bures), the optional ``--svd``
        residual ``− η_res (W0 C_res) C_resᵀ`` on the right, then the entropy rollback
        ``W = diag(α) W_new + diag(1 − α) W0`` with ``α_i = α_min + (1 − α_min) e_i``."""
        eta, s_p = self.erase_scale, self.preserve_scale
        eye = torch.eye(w0.shape[1], dtype=w0.dtype, device=w0.device)
        e, _ = entropy_factor(
            w0, tx.last, self.entropy_samples, self.noise_sigma, self.entropy_bins, gen
        )
        mi = informax_mi(w0, tx.last, tx.neutral, self.mi_samples, self.noise_sigma, gen)
        if self.use_mi_softmask:
            mask_k = code_mask(mi, self.mi_power, self.mi_temperature)
        else:
            mask_k = torch.ones_like(mi)
        targets = (w0 @ tx.guide_rows.T)[:, tx.guide_pos] * mask_k[:, tx.owner]
        lhs = self.lamb * eye + shared.cct + eta * shared.xtx + s_p * shared.ktk
        rhs = self.lamb * w0 + eta * targets @ tx.context + s_p * w0 @ shared.ktk
        if self.svd_residual:
            c_res = residual_directions(shared, tx.last, self.sigma_temperature, self.sigma_power)
            rhs = rhs - self.residual_scale * (w0 @ c_res.T) @ c_res
        lhs = (lhs + lhs.T) / 2
        w_new = torch.linalg.solve(lhs, rhs.T).T
        residual = (w_new @ lhs - rhs).norm(dim=1).max() / rhs.norm(dim=1).max().clamp_min(1e-300)
        alpha = self.alpha_min + (1.0 - self.alpha_min) * e
        w = alpha[:, None] * w_new + (1.0 - alpha[:, None]) * w0
        return w, {
            "mi": mi,
            "mask_max": mask_k.amax(1),
            "mask_k": mask_k,
            "alpha": alpha,
            "residual": float(residual),
        }

    def paper_operator(self, shared: Shared) -> torch.Tensor:
        """A = λI + S + R (+ s_p KᵀK): the same for every weight."""
        dim = shared.xtx.shape[0]
        eye = torch.eye(dim, dtype=shared.xtx.dtype, device=shared.xtx.device)
        a = self.lamb * eye + shared.xtx + paper_spectral(shared) + self.preserve_scale * shared.ktk
        return (a + a.T) / 2

    def paper_system(
        self, w0: torch.Tensor, tx: TextRows, shared: Shared, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(α, Y, logged) of the paper's ``diag(α) W + W A = Y`` (§3.2, §6)."""
        mi = informax_mi(w0, tx.last, tx.neutral, self.mi_samples, self.noise_sigma, gen)
        alpha = paper_alpha(mi)
        y = self.preserve_scale * w0 @ shared.ktk
        if self.paper_target == "guide":  # V* = W0 g for each concept's aligned guide token
            y = y + (w0 @ tx.guide_last.T) @ tx.last
        if self.paper_anchor:  # read λI as an anchor to W0 rather than to 0
            y = y + self.lamb * w0
        return alpha, y, {"mi": mi, "mask_max": alpha}

    def edit_paper(
        self,
        w0: torch.Tensor,
        tx: TextRows,
        shared: Shared,
        gen: torch.Generator,
        eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        a = self.paper_operator(shared)
        eig = eig if eig is not None else torch.linalg.eigh(a)
        alpha, y, logged = self.paper_system(w0, tx, shared, gen)
        w_star = solve_sylvester(alpha, a, y, eig)
        err = (alpha[:, None] * w_star + w_star @ a - y).norm(dim=1).max()
        logged["residual"] = float(err / y.norm(dim=1).max().clamp_min(1e-300))
        logged["bures_to_base"] = bures_distance(w_star, w0)
        return bures_geodesic(w_star, w0, self.geodesic_step), logged

    # -- the edit --
    @torch.no_grad()
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"edited_matrices": 0, "variant": self.variant}
        start = time.perf_counter()
        tx = self.rows(request.engine, request.targets, request.retain)
        shared = shared_products(tx)
        mis, masks, masks_k, mus, residuals, bures, alphas = [], [], [], [], [], [], []
        eig = None  # the paper's A, eigendecomposed once for every weight
        modules = self.kv_modules(request.engine)
        for name, module in modules:
            w0 = module.weight.detach().double()
            if tx.last.device != w0.device:
                tx, shared = move_to(tx, w0.device), move_to(shared, w0.device)
            gen = matrix_generator(request.seed, name)
            if self.variant == "code":
                w, logged = self.edit_code(w0, tx, shared, gen)
                masks_k.append(logged["mask_k"].cpu())
                mus.append(logged["mu"])
            elif self.variant == "erase":
                w, logged = self.edit_erase(w0, tx, shared, gen)
                masks_k.append(logged["mask_k"].cpu())
                alphas.append(logged["alpha"].cpu())
            else:
                if eig is None:
                    eig = torch.linalg.eigh(self.paper_operator(shared))
                w, logged = self.edit_paper(w0, tx, shared, gen, eig)
                bures.append(logged["bures_to_base"])
            mis.append(logged["mi"].cpu())
            masks.append(logged["mask_max"].cpu())
            residuals.append(logged["residual"])
            module.weight.copy_(w.to(module.weight.dtype))
        mi = mi_summary(mis)
        if mi["constant_columns"]:
            log.warning(
                "ScaPre: the Informax MI is constant across rows in %d of %d (matrix, concept) "
                "columns (mean %.4f nats, ln 2 = %.4f): the soft mask is a constant there",
                mi["constant_columns"],
                mi["columns"],
                mi["mean"],
                LN2,
            )
        info: dict[str, Any] = {
            "variant": self.variant,
            "edited_matrices": len(modules),
            "concept_texts": int(tx.last.shape[0]),
            "context_rows": int(tx.context.shape[0]),
            "preserve_rows": int(tx.keep.shape[0]),
            "mi": mi,
            "mask": summary(torch.cat(masks)),
            "max_relative_residual": max(residuals),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if self.variant in ("code", "erase"):
            info["mask_per_concept"] = summary(torch.cat([m.flatten() for m in masks_k]))
        if self.variant == "code":
            info["mu"] = summary(torch.tensor(mus, dtype=torch.float64))
        elif self.variant == "erase":
            info["rollback_alpha"] = summary(torch.cat(alphas))
        else:
            info["bures_to_base_before_geodesic"] = summary(
                torch.tensor(bures, dtype=torch.float64)
            )
        return info


def move_to(obj: Any, device: torch.device) -> Any:
    """A copy of a tensor dataclass (TextRows, Shared) on ``device``."""
    return type(obj)(**{k: getattr(obj, k).to(device) for k in obj.__dataclass_fields__})
