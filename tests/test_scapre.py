"""ScaPre: every solved row satisfies its normal equations (code) and every solved matrix the
Sylvester equation (paper); the Bures steps do what they say; only attn2 K/V change; empty
targets change nothing; an edit is a function of its seed; the Informax MI is logged."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_engine

from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.scapre import (
    RowSystem,
    ScaPre,
    bures_distance,
    bures_geodesic,
    bures_rows,
    code_mask,
    concept_projector,
    entropy_factor,
    informax_mi,
    matrix_generator,
    shared_products,
    solve_cholesky,
    solve_woodbury,
)

TASK = load_task("objects", "tiny")
KV = ("attn2.to_k.weight", "attn2.to_v.weight")


def request(engine, targets, retain, seed: int = 0) -> EraseRequest:
    return EraseRequest(tuple(targets), tuple(retain), seed, TASK, engine)


def edit(method: ScaPre, n: int = 2, seed: int = 0):
    """(engine, base weights, info) after erasing the first ``n`` concepts."""
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    targets, retain = TASK.split(n)
    info = method.erase(request(engine, targets, retain, seed))
    return engine, base, info


def weights(engine) -> dict[str, torch.Tensor]:
    named = artifacts.named_tensors(engine.pipe).items()
    return {n: t.detach().double() for n, t in named if n.endswith(KV)}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"enable_ased": True},
        {"use_mi_softmask": False, "erase_scale": 1.0},
        {"preserve_retain": True, "solver": "cholesky"},
    ],
)
def test_code_rows_satisfy_their_normal_equations(settings: dict) -> None:
    """§3.3 e, rebuilt densely row by row from the spec's formula (not from the solver's pieces):
    [(λ+μ)I + R + CCᵀ + η Σxxᵀ + η m_i Π_C (+ s_p KᵀK)] w_i = (λ+μ) w0_i + V_i (+ s_p KᵀK w0_i)."""
    method = ScaPre(**settings)
    engine, base, info = edit(method)
    targets, retain = TASK.split(2)
    tx = method.rows(engine, targets, retain)
    shared = shared_products(tx)
    lam, eta, s_p = method.lamb, method.erase_scale, method.preserve_scale
    c, x, keep = tx.last, tx.context, tx.keep
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    for name in weights(engine):
        w0 = base[name].double()
        system, logged = method.code_system(w0, tx, shared, matrix_generator_for(name))
        solve = solve_woodbury if method.solver == "woodbury" else solve_cholesky
        w = solve(system)
        mu = system.mu
        u, sv, _ = torch.linalg.svd(c.T, full_matrices=False)
        gate = torch.sigmoid((sv - sv.median()) / method.sigma_temperature) ** method.sigma_power
        r = (u * (mu * (1 - gate))) @ u.T if method.enable_ased else 0 * eye
        common = (lam + mu) * eye + r + c.T @ c + eta * x.T @ x + s_p * keep.T @ keep
        proj = concept_projector(c)
        v = torch.zeros_like(w0)
        for k in range(c.shape[0]):
            rows = tx.owner == k
            v += eta * (logged["mask_k"][:, k : k + 1] * (w0 @ tx.guide[rows].T)) @ x[rows]
        assert torch.allclose(v, system.rhs - (lam + mu) * w0 - s_p * w0 @ keep.T @ keep)
        worst = 0.0
        for i in range(w.shape[0]):
            m_i = common + eta * logged["mask_max"][i] * proj
            b_i = (lam + mu) * w0[i] + v[i] + s_p * keep.T @ keep @ w0[i]
            scale = torch.linalg.matrix_norm(m_i, 2) * w[i].norm() + b_i.norm()
            worst = max(worst, float((m_i @ w[i] - b_i).norm() / scale))
        assert worst < 1e-12, (name, worst)
    assert info["max_relative_residual"] < 1e-10


@pytest.mark.parametrize(
    "settings",
    [
        {"alpha_min": 0.8, "mi_power": 2.0, "erase_scale": 1.0},
        {"alpha_min": 1.0, "svd_residual": True, "preserve_retain": True},
    ],
)
def test_erase_variant_is_erase_py_solve_then_entropy_rollback(settings: dict) -> None:
    """erase.py (§3.3, the Imagenette script), rebuilt densely from the spec: W_new solves
    W (λI + CCᵀ + η Σxxᵀ) = λ W0 + η Σ_k diag(m_k) Σ (W0 g) xᵀ (− η (W0 C_res) C_resᵀ with
    --svd) — λ, not λ + μ, and no η m_max Π_C — and the weight written is
    diag(α) W_new + diag(1 − α) W0 with α_i = α_min + (1 − α_min) e_i."""
    method = ScaPre(variant="erase", **settings)
    engine, base, info = edit(method)
    targets, retain = TASK.split(2)
    tx = method.rows(engine, targets, retain)
    lam, eta, s_p = method.lamb, method.erase_scale, method.preserve_scale
    c, x, keep = tx.last, tx.context, tx.keep
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    lhs = lam * eye + c.T @ c + eta * x.T @ x + s_p * keep.T @ keep
    u, sv, _ = torch.linalg.svd(c.T, full_matrices=False)
    gate = torch.sigmoid((sv - sv.median()) / method.sigma_temperature) ** method.sigma_power
    c_res = ((eye - (u * gate) @ u.T) @ c.T).T
    for name, w in weights(engine).items():
        w0 = base[name].double()
        gen = matrix_generator_for(name)
        e, _ = entropy_factor(w0, c, method.entropy_samples, 0.01, method.entropy_bins, gen)
        mask = code_mask(informax_mi(w0, c, tx.neutral, 5, 0.01, gen), method.mi_power, 0.7)
        rhs = lam * w0 + s_p * w0 @ keep.T @ keep
        for k in range(c.shape[0]):
            rows = tx.owner == k
            rhs += eta * (mask[:, k : k + 1] * (w0 @ tx.guide[rows].T)) @ x[rows]
        if method.svd_residual:
            rhs -= eta * (w0 @ c_res.T) @ c_res
        w_new = torch.linalg.solve(lhs, rhs.T).T
        alpha = method.alpha_min + (1 - method.alpha_min) * e
        expected = alpha[:, None] * w_new + (1 - alpha[:, None]) * w0
        assert torch.allclose(w, expected, atol=1e-5, rtol=1e-4), name
        if method.alpha_min < 1:
            assert (alpha < 1).any() and not torch.allclose(w, w_new, atol=1e-5), name
    assert info["variant"] == "erase" and info["max_relative_residual"] < 1e-10
    assert info["rollback_alpha"]["min"] >= method.alpha_min


def test_imagenette_arm_runs_erase_py_with_its_flags() -> None:
    """script/erase.sh's Imagenette-10 command: erase.py --p 2 --alpha_min 0.8
    --entropy_samples 20 (η = 1)."""
    import yaml

    root = __import__("pathlib").Path(__file__).parent.parent / "conf"
    defaults = yaml.safe_load((root / "method/scapre.yaml").read_text())["settings"]
    arm = yaml.safe_load((root / "experiment/arm/scapre_imagenette.yaml").read_text())
    method = ScaPre(**{**defaults, **arm["method"]["settings"]})
    assert method.variant == "erase" and method.alpha_min == 0.8 and method.mi_power == 2
    assert (method.erase_scale, method.entropy_samples, method.svd_residual) == (1.0, 20, False)


def matrix_generator_for(param_name: str) -> torch.Generator:
    """The generator the method used for this parameter (seeded from seed 0 and module name)."""
    return matrix_generator(0, param_name.removeprefix("unet.").removesuffix(".weight"))


def test_woodbury_equals_per_row_cholesky() -> None:
    gen = torch.Generator().manual_seed(1)
    dim, rows, rank = 24, 40, 5
    a = torch.randn(dim, 3 * dim, generator=gen, dtype=torch.float64)
    f = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
    system = RowSystem(
        base=a @ a.T / dim + 0.3 * torch.eye(dim, dtype=torch.float64),
        proj_factor=f,
        scale=torch.rand(rows, generator=gen, dtype=torch.float64) * 4,
        rhs=torch.randn(rows, dim, generator=gen, dtype=torch.float64),
        w0=torch.zeros(rows, dim, dtype=torch.float64),
        lam_prime=1.0,
        mu=0.0,
    )
    fast, slow = solve_woodbury(system), solve_cholesky(system, chunk_bytes=8 * dim * dim * 7)
    assert torch.allclose(fast, slow, atol=1e-10, rtol=1e-9)
    assert system.residual(fast) < 1e-12


def test_bures_row_blend_follows_the_code() -> None:
    """§3.3 f, checked per row in plain Python arithmetic, and end to end on the tiny model."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    w0 = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    lam_p, mu = 0.9, 0.4
    for iters in (1, 2):
        out = bures_rows(a, w0, lam_p, mu, iters)
        for i in range(6):
            na, r0 = a[i].norm(), w0[i].norm()
            ua, u0 = a[i] / na, w0[i] / r0
            u = ua
            for _ in range(iters):
                kappa = max(0.0, float(u @ u0))
                r = (lam_p * na + mu * r0 * kappa) / (lam_p + mu)
                u = lam_p * na * ua + mu * r0 * kappa * u0
                u = u / u.norm()
            assert torch.allclose(out[i], r * u, atol=1e-12)
    # the released loop runs max(1, iters) times: 0 is one pass, not "off"
    assert torch.equal(bures_rows(a, w0, lam_p, mu, 0), bures_rows(a, w0, lam_p, mu, 1))
    assert not torch.allclose(bures_rows(a, w0, lam_p, mu, 0), a)

    method = ScaPre(bures_iters=1)
    engine1, base, _ = edit(method)
    engine0, _, _ = edit(ScaPre(bures_iters=0))
    w_final, w_zero = weights(engine1), weights(engine0)
    targets, _ = TASK.split(2)
    tx = method.rows(engine1, targets, ())
    shared = shared_products(tx)
    for name in w_final:
        system, _ = method.code_system(base[name].double(), tx, shared, matrix_generator_for(name))
        solved = solve_woodbury(system)
        expected = bures_rows(solved, base[name].double(), system.lam_prime, system.mu, 1)
        assert torch.allclose(w_final[name], expected, atol=1e-5), name
        assert torch.equal(w_zero[name], w_final[name]), name
        assert not torch.allclose(w_final[name], solved, atol=1e-5), name


@pytest.mark.parametrize(("target", "anchor"), [("zero", True), ("guide", True), ("guide", False)])
def test_paper_matrix_satisfies_the_sylvester_equation(target: str, anchor: bool) -> None:
    """diag(α) W + W (λI + S + R) = V* C_Eᵀ (+ λ W0 with the anchor), α = MI / max MI."""
    method = ScaPre(variant="paper", geodesic_step=0.0, paper_target=target, paper_anchor=anchor)
    engine, base, info = edit(method)
    targets, _ = TASK.split(2)
    tx = method.rows(engine, targets, ())
    c, x = tx.last, tx.context
    u, sv, _ = torch.linalg.svd(c.T, full_matrices=False)
    a = method.lamb * torch.eye(c.shape[1], dtype=torch.float64) + x.T @ x
    a += (u * ((1 - torch.sigmoid(sv)) * sv)) @ u.T
    for name, w in weights(engine).items():
        w0 = base[name].double()
        mi = informax_mi(
            w0, c, tx.neutral, method.mi_samples, method.noise_sigma, matrix_generator_for(name)
        )
        alpha = mi.amax(1) / mi.amax()
        y = method.lamb * w0 if anchor else torch.zeros_like(w0)
        if target == "guide":
            y = y + (w0 @ tx.guide_rows[0]).unsqueeze(1) * c.sum(0)  # V* = W0 g for every c_k
        lhs = alpha[:, None] * w + w @ a
        scale = (alpha.max() + torch.linalg.matrix_norm(a, 2)) * w.norm() + y.norm()
        assert float((lhs - y).norm() / scale) < 1e-6, name  # backward error, float32 weights
    assert info["max_relative_residual"] < 1e-10


def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    ev, vec = torch.linalg.eigh((m + m.T) / 2)
    return (vec * ev.clamp_min(0).sqrt()) @ vec.T


def bures_by_trace(w: torch.Tensor, v: torch.Tensor) -> float:
    """The paper's Eq. 5 on the row covariances, with matrix square roots."""
    a, b = w @ w.T, v @ v.T
    ra = sqrtm_psd(a)
    sq = a.trace() + b.trace() - 2 * sqrtm_psd(ra @ b @ ra).trace()
    return float(sq.clamp_min(0).sqrt())


@pytest.mark.parametrize(("rows", "cols"), [(5, 9), (9, 5)])
def test_geodesic_step_lies_on_the_bures_geodesic(rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(3)
    w_star = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    total = bures_by_trace(w_star, w0)
    assert bures_distance(w_star, w0) == pytest.approx(total, rel=1e-8)
    for t in (0.25, 0.5, 0.8):
        w_t = bures_geodesic(w_star, w0, t)
        assert bures_by_trace(w_t, w_star) == pytest.approx(t * total, rel=1e-6, abs=1e-8)
        assert bures_by_trace(w_t, w0) == pytest.approx((1 - t) * total, rel=1e-6, abs=1e-8)
        cross = w_t.T @ w_star  # Procrustes-aligned with W*: the cross term is symmetric PSD
        assert torch.allclose(cross, cross.T, atol=1e-9)
        assert torch.linalg.eigvalsh((cross + cross.T) / 2).min() > -1e-9
    assert torch.allclose(
        bures_geodesic(w_star, w0, 1.0) @ bures_geodesic(w_star, w0, 1.0).T, w0 @ w0.T, atol=1e-9
    )


def test_bare_paper_form_with_zero_target_only_rescales_the_weights() -> None:
    """V* = 0 without the anchor gives W* = 0, so the geodesic step returns t·W0 (why
    ``paper_anchor`` defaults to true)."""
    method = ScaPre(variant="paper", paper_anchor=False, paper_target="zero", geodesic_step=0.3)
    engine, base, _ = edit(method)
    for name, w in weights(engine).items():
        assert torch.allclose(w, 0.3 * base[name].double(), atol=1e-6), name


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_only_attn2_kv_change_and_info_is_logged(variant: str) -> None:
    engine, base, info = edit(ScaPre(variant=variant))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    kv = [
        n for n, _ in engine.pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))
    ]
    assert not non_finite
    assert sorted(delta.changed) == sorted(f"unet.{n}.weight" for n in kv)
    assert info["edited_matrices"] == len(kv) and info["variant"] == variant
    mi = info["mi"]
    assert 0.0 <= mi["min"] <= mi["mean"] <= mi["max"] <= math.log(2) + 1e-9 and mi["std"] >= 0
    n_values = sum(base[f"unet.{n}.weight"].shape[0] for n in kv) * info["concept_texts"]
    assert sum(mi["hist_counts"]) == n_values and len(mi["hist_edges"]) == 11
    assert 0 <= mi["constant_columns"] <= mi["columns"] == len(kv) * info["concept_texts"]
    assert {"min", "mean", "max", "std"} <= set(info["mask"])


def test_empty_targets_leave_weights_unchanged() -> None:
    for variant in ("code", "paper"):
        engine = tiny_engine()
        base = artifacts.snapshot(engine.pipe)
        info = ScaPre(variant=variant).erase(request(engine, [], TASK.concepts))
        delta, _ = artifacts.extract(engine.pipe, base)
        assert delta.changed == [] and info["edited_matrices"] == 0


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_an_edit_is_a_function_of_its_seed(variant: str) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    first, _, info = edit(ScaPre(variant=variant), seed=7)
    torch.manual_seed(456)
    again, _, info_again = edit(ScaPre(variant=variant), seed=7)
    first, again = weights(first), weights(again)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert info["mi"] == info_again["mi"] and info["mask"] == info_again["mask"]
    if variant == "code":  # the paper's α only sees thresholded counts, often seed-free
        other = weights(edit(ScaPre(variant=variant), seed=8)[0])
        assert any(not torch.equal(first[n], other[n]) for n in first)


def test_retained_outputs_barely_move_with_preservation_and_erased_collapse() -> None:
    """The released code preserves nothing (§3.3: its preserve block is commented out); the
    harness's ``preserve_retain`` term keeps the retained concepts' K/V outputs in place (shown on
    erase.py's plain solve: the code variant's Bures blend always runs and moves every row)."""
    method = ScaPre(variant="erase", alpha_min=1.0, preserve_retain=True, preserve_scale=100.0)
    engine = tiny_engine()
    targets, retain = TASK.split(1)
    keep = method.rows(engine, retain, ()).last
    gone = method.rows(engine, targets, ()).last
    base = weights(engine)
    method.erase(request(engine, targets, retain))
    for name, w in weights(engine).items():
        w0 = base[name]
        shift = ((keep @ (w - w0).T).norm(dim=1) / (keep @ w0.T).norm(dim=1)).max()
        left = ((gone @ w.T).norm(dim=1) / (gone @ w0.T).norm(dim=1)).max()
        assert shift < 0.02, (name, float(shift))
        assert left < 0.2, (name, float(left))


def test_code_edit_is_confined_to_the_span_of_the_target_rows() -> None:
    """Before the Bures blend, W − W0 vanishes on every input orthogonal to the target concepts'
    token rows: a retained concept outside that span keeps its exact K/V output."""
    gen = torch.Generator().manual_seed(4)
    dim, n_tok = 40, 12
    method = ScaPre(enable_ased=True)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    inside, outside = basis[:, :n_tok], basis[:, n_tok:]
    rows = torch.randn(n_tok, n_tok, generator=gen, dtype=torch.float64) @ inside.T
    from methods.scapre import TextRows

    tx = TextRows(
        last=rows[[0, 6]],
        context=rows,
        guide_rows=torch.randn(6, dim, generator=gen, dtype=torch.float64),
        guide_pos=torch.arange(6).repeat(2),
        owner=torch.arange(2).repeat_interleave(6),
        neutral=torch.randn(dim, generator=gen, dtype=torch.float64),
        keep=torch.zeros(0, dim, dtype=torch.float64),
    )
    w0 = torch.randn(30, dim, generator=gen, dtype=torch.float64)
    system, _ = method.code_system(w0, tx, shared_products(tx), matrix_generator(0, "x"))
    w = solve_woodbury(system)
    assert (w - w0).abs().max() > 1e-3
    assert torch.allclose(
        (w - w0) @ outside, torch.zeros(30, dim - n_tok, dtype=torch.float64), atol=1e-10
    )


def test_informax_mi_degenerates_to_a_constant_mask_when_inputs_separate() -> None:
    """§3.3 c's suspicion: σ_n = 0.01 noise around well-separated c_k and e_∅ makes every row
    separate perfectly, so MI = ln 2 everywhere and the z-scored mask is the constant 0.5^p.
    A row that cannot tell them apart has MI near 0 (and then the other rows share one mask)."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.rand(50, 16, generator=gen, dtype=torch.float64) + 0.1  # every row sees c_k
    concept = torch.full((1, 16), 7.0, dtype=torch.float64)
    neutral = torch.zeros(16, dtype=torch.float64)
    mi = informax_mi(w0, concept, neutral, 5, 0.01, gen)
    assert mi.shape == (50, 1)
    assert torch.allclose(mi, torch.full_like(mi, math.log(2)), atol=1e-6)
    for p in (2, 5, 8):
        assert torch.allclose(code_mask(mi, p, 0.7), torch.full_like(mi, 0.5**p))
    blind = torch.cat([w0, torch.zeros(1, 16, dtype=torch.float64)])  # a row blind to its input
    mi = informax_mi(blind, concept, neutral, 5, 0.01, gen)
    assert mi[-1, 0] < 0.3 and torch.allclose(mi[:-1], torch.full_like(mi[:-1], math.log(2)))
    mask = code_mask(mi, 5, 0.7)
    assert torch.allclose(mask[:-1], mask[0].expand(50, 1)) and mask[-1, 0] < 1e-6


def test_entropy_factor_is_one_minus_normalised_entropy() -> None:
    gen = torch.Generator().manual_seed(6)
    concept = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    flat = torch.zeros(4, 8, dtype=torch.float64)  # rows that ignore their input: one bin
    e, mu = entropy_factor(flat, concept, 10, 0.01, 20, gen)
    assert torch.allclose(e, torch.ones(4, dtype=torch.float64)) and mu == pytest.approx(0.0)
    w0 = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    e, mu = entropy_factor(w0, concept, 200, 1.0, 20, gen)  # a broad spread over the bins
    assert ((e >= 0) & (e < 0.35)).all() and mu == pytest.approx(float((1 - e).mean()))


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(FiaBenchError, match=r"unknown ScaPre variant 'cod'.*did you mean 'code'"):
        ScaPre(variant="cod")
    with pytest.raises(FiaBenchError, match="unknown ScaPre solver"):
        ScaPre(solver="lu")
    with pytest.raises(FiaBenchError, match="geodesic_step"):
        ScaPre(geodesic_step=2.0)
    with pytest.raises(FiaBenchError, match="alpha_min"):
        ScaPre(variant="erase", alpha_min=1.5)
    with pytest.raises(FiaBenchError, match="bures_iters"):
        ScaPre(bures_iters=-1)
    with pytest.raises(FiaBenchError, match="concept_type"):
        ScaPre(add_prompts=True, concept_type="art", templates={"object": ["{concept}"]})


def test_yaml_settings_construct_the_method_and_templates_expand() -> None:
    import yaml

    from fia_bench.registry import METHODS

    path = __import__("pathlib").Path(__file__).parent.parent / "conf/method/scapre.yaml"
    cfg = yaml.safe_load(path.read_text())
    method = METHODS.get(cfg["name"])(**cfg["settings"])
    assert type(method).__qualname__ == "ScaPre" and method.variant == "code"
    assert method.concept_texts(("church",)) == ["church"]
    expanded = METHODS.get("scapre")(**{**cfg["settings"], "add_prompts": True})
    texts = expanded.concept_texts(("church",))
    assert texts[0] == "church" and len(texts) == 1 + len(cfg["settings"]["templates"]["object"])
    assert all("church" in t for t in texts)
