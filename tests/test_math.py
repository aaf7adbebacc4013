"""The gated rank-1 edit's properties (docs/design.md, "What the tests assert"), with numbers (float64 where exact)."""
import math

import pytest
import torch
from conftest import random_spd

from perfusion_ext.core.gated_edit import ProjectionEdit, ema_update

D, OUT = 24, 16


def edit_for(i_stars, cov, targets, strengths=None, beta=0.7, tau=0.15, linear_gate=False):
    n = len(i_stars)
    I = torch.stack(i_stars)
    U = torch.linalg.solve(cov, I.T).T
    return ProjectionEdit(
        target_inputs=I, target_inputs_cinv=U, target_outputs=torch.stack(targets),
        strengths=torch.tensor(strengths or [1.0] * n, dtype=torch.float64),
        betas=torch.full((n,), beta, dtype=torch.float64), taus=torch.full((n,), tau, dtype=torch.float64),
        linear_gate=linear_gate,
    )


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(OUT, D, generator=g, dtype=torch.float64)
    cov = random_spd(D, seed=5)
    i_star = torch.randn(D, generator=g, dtype=torch.float64)
    i_super = torch.randn(D, generator=g, dtype=torch.float64)
    o_v = torch.randn(OUT, generator=g, dtype=torch.float64)
    return W, cov, i_star, i_super, o_v, g


def out(edit, W, e):
    return edit.apply(e, e @ W.T, W)


def test_full_gate_gives_locked_key_and_value_target(setup):
    W, cov, i_star, i_super, o_v, _ = setup
    o_k = W @ i_super  # key locking: o*_K = W_k i_super
    always_on = dict(beta=-1e9, tau=1.0)  # sigmoid(+huge) == 1 exactly
    assert torch.equal(edit_for([i_star], cov, [o_k], **always_on).coefficients(i_star)[1], torch.ones(1, dtype=torch.float64))
    got_k = out(edit_for([i_star], cov, [o_k], **always_on), W, i_star)
    got_v = out(edit_for([i_star], cov, [o_v], **always_on), W, i_star)
    assert torch.allclose(got_k, W @ i_super, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_v, o_v, rtol=1e-12, atol=1e-12)
    # With the real gate, out(i*) = σ((1−β)/τ) o*.
    got = out(edit_for([i_star], cov, [o_v], beta=0.7, tau=0.15), W, i_star)
    assert torch.allclose(got, o_v / (1 + math.exp(-(1 - 0.7) / 0.15)), rtol=1e-12)


def test_linear_gate_equals_rome_update(setup):
    W, cov, i_star, _, o_v, g = setup
    u = torch.linalg.solve(cov, i_star)
    rome = W + torch.outer(o_v - W @ i_star, u) / (u @ i_star)
    e = torch.randn(5, 7, D, generator=g, dtype=torch.float64)
    got = out(edit_for([i_star], cov, [o_v], linear_gate=True), W, e)
    rel = (got - e @ rome.T).norm() / (e @ rome.T).norm()
    assert rel <= 1e-10


def test_orthogonal_input_gets_only_gate_floor(setup):
    W, cov, i_star, _, o_v, g = setup
    u = torch.linalg.solve(cov, i_star)
    r = torch.randn(D, generator=g, dtype=torch.float64)
    e = r - (r @ u) / (u @ u) * u
    assert abs(float(u @ e)) < 1e-12
    got = out(edit_for([i_star], cov, [o_v], beta=0.7, tau=0.15), W, e)
    expected = W @ e + torch.sigmoid(torch.tensor(-0.7 / 0.15, dtype=torch.float64)) * o_v
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3])
def test_covariance_scale_invariance(setup, n):
    W, cov, _, _, _, g = setup
    i_stars = [torch.randn(D, generator=g, dtype=torch.float64) for _ in range(n)]
    targets = [torch.randn(OUT, generator=g, dtype=torch.float64) for _ in range(n)]
    e = torch.randn(4, 9, D, generator=g, dtype=torch.float64)
    e[0, 0] = i_stars[0]
    base = out(edit_for(i_stars, cov, targets), W, e)
    for c in (1e-3, 7.5, 1e4):
        scaled = out(edit_for(i_stars, c * cov, targets), W, e)
        assert (scaled - base).norm() / base.norm() <= 1e-10


def test_multi_concept_projection(setup):
    W, cov, i_star, _, o_v, g = setup
    e = torch.randn(6, D, generator=g, dtype=torch.float64)
    # n = 1 through the multi-concept path equals the paper's single-concept formula.
    u = torch.linalg.solve(cov, i_star)
    s = (e @ u) / (u @ i_star)
    gate = torch.sigmoid((s - 0.7) / 0.15)
    single = e @ W.T - s[:, None] * (W @ i_star) + gate[:, None] * o_v
    assert torch.allclose(out(edit_for([i_star], cov, [o_v]), W, e), single, rtol=1e-12, atol=1e-12)
    # n = 3: P(i*_k) = i*_k and the residual is C⁻¹-orthogonal to every i*_k.
    i_stars = [i_star] + [torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2)]
    edit = edit_for(i_stars, cov, [o_v] * 3)
    for ik in i_stars:
        assert torch.allclose(edit.project(ik), ik, rtol=1e-10, atol=1e-10)
    residual = e - edit.project(e)
    cinv_i = torch.linalg.solve(cov, torch.stack(i_stars).T)
    assert (residual @ cinv_i).abs().max() <= 1e-10 * e.abs().max()


def test_strength_scales_each_concept_term(setup):
    W, cov, i_star, _, o_v, g = setup
    i2 = torch.randn(D, generator=g, dtype=torch.float64)
    o2 = torch.randn(OUT, generator=g, dtype=torch.float64)
    e = torch.randn(8, D, generator=g, dtype=torch.float64)
    e[0] = i_star
    full = edit_for([i_star, i2], cov, [o_v, o2], strengths=[1.0, 1.0]).delta(e, W)
    only1 = edit_for([i_star, i2], cov, [o_v, o2], strengths=[1.0, 0.0]).delta(e, W)
    only2 = edit_for([i_star, i2], cov, [o_v, o2], strengths=[0.0, 1.0]).delta(e, W)
    assert torch.allclose(full, only1 + only2, rtol=1e-12, atol=1e-12)
    half = edit_for([i_star, i2], cov, [o_v, o2], strengths=[0.5, 0.0]).delta(e, W)
    assert torch.allclose(half, 0.5 * only1, rtol=1e-12, atol=1e-12)
    zero = edit_for([i_star, i2], cov, [o_v, o2], strengths=[0.0, 0.0])
    base = e @ W.T
    assert torch.equal(out(zero, W, e), base)


def test_permuting_tokens_permutes_outputs(setup):
    W, cov, i_star, _, o_v, g = setup
    e = torch.randn(2, 77, D, generator=g, dtype=torch.float64)
    e[:, 5] = i_star
    perm = torch.randperm(77, generator=g)
    edit = edit_for([i_star], cov, [o_v])
    assert torch.allclose(out(edit, W, e[:, perm]), out(edit, W, e)[:, perm], rtol=1e-12, atol=1e-12)


def test_raising_beta_never_raises_gate(setup):
    _, cov, i_star, _, o_v, g = setup
    e = torch.randn(500, D, generator=g, dtype=torch.float64)
    e[:50] = i_star + 0.1 * e[:50]
    previous = None
    for beta in torch.linspace(-1, 2, 31):
        gate = edit_for([i_star], cov, [o_v], beta=float(beta)).coefficients(e)[1]
        if previous is not None:
            assert (gate <= previous).all()
        previous = gate


def test_ema_closed_form():
    i0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    x = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    cur = i0
    for _ in range(250):
        cur = ema_update(cur, x, 0.99)
    expected = 0.99**250 * i0 + (1 - 0.99**250) * x
    assert torch.allclose(cur, expected, rtol=1e-12)


def test_gate_runs_in_fp32_for_half_inputs(setup):
    W, cov, i_star, _, o_v, g = setup
    edit = edit_for([i_star], cov, [o_v])
    e = (i_star + 0.01 * torch.randn(D, generator=g, dtype=torch.float64)).repeat(3, 1)
    alpha16, gate16 = edit.coefficients(e.half())
    assert gate16.dtype == torch.float32 and alpha16.dtype == torch.float32
    delta16 = edit.delta(e.half(), W.half())
    assert delta16.dtype == torch.float32
    ref = edit.delta(e.half().double(), W.half().double())
    assert ((delta16.double() - ref).norm() / ref.norm()) < 1e-5


def test_competitive_gates_keep_only_each_tokens_most_open_gate(setup):
    W, cov, i_star, _, o_v, g = setup
    i2 = torch.randn(D, generator=g, dtype=torch.float64)
    o2 = torch.randn(OUT, generator=g, dtype=torch.float64)
    e = torch.randn(7, D, generator=g, dtype=torch.float64)
    e[0], e[1], e[2] = i_star, i2, 0.6 * i_star + 0.55 * i2  # each concept's own word, then a word near both
    plain = edit_for([i_star, i2], cov, [o_v, o2], strengths=[1.0, 0.8])
    competitive = edit_for([i_star, i2], cov, [o_v, o2], strengths=[1.0, 0.8])
    competitive.competitive = True
    # the formula, in float64: g_k·[s_k = max_j s_j] replaces g_k; the projection α is unchanged
    U = torch.linalg.solve(cov, torch.stack([i_star, i2]).T).T
    s = (e @ U.T) / (U * torch.stack([i_star, i2])).sum(-1)
    gates = torch.sigmoid((s - 0.7) / 0.15)
    kept = gates * (s == s.max(-1, keepdim=True).values)
    alpha, _ = plain.coefficients(e)
    w = torch.tensor([1.0, 0.8], dtype=torch.float64)
    expected = (w * kept) @ torch.stack([o_v, o2]) - (w * alpha) @ (torch.stack([i_star, i2]) @ W.T)
    assert torch.allclose(competitive.delta(e, W), expected, rtol=1e-12, atol=1e-12)
    # on each concept's own word only its own gate acts; where the gates differ the delta differs
    _, kept_gates = competitive.coefficients(e)
    full = 1 / (1 + math.exp(-(1 - 0.7) / 0.15))  # s = 1 on the concept's own word
    assert kept_gates[0, 1] == 0 and kept_gates[1, 0] == 0
    assert math.isclose(kept_gates[0, 0], full, rel_tol=1e-12) and math.isclose(kept_gates[1, 1], full, rel_tol=1e-12)
    assert (kept_gates > 0).sum(-1).eq(1).all()
    assert not torch.allclose(competitive.delta(e, W)[2], plain.delta(e, W)[2])
    # one concept: competitive gates are the plain gates, bit for bit
    alone = edit_for([i_star], cov, [o_v])
    alone_competitive = edit_for([i_star], cov, [o_v])
    alone_competitive.competitive = True
    assert torch.equal(alone.delta(e, W), alone_competitive.delta(e, W))


def test_competitive_gates_follow_the_most_similar_concept_when_betas_differ(setup):
    """A concept with a lower β opens wider on another concept's own word than that concept does; competitive
    gates still give each word to the concept it is most similar to."""
    W, cov, i_star, _, o_v, g = setup
    i2 = torch.randn(D, generator=g, dtype=torch.float64)
    o2 = torch.randn(OUT, generator=g, dtype=torch.float64)
    edit = edit_for([i_star, i2], cov, [o_v, o2])
    edit.competitive = True
    edit.set_gates([0.9, 0.2], [0.15, 0.15])
    U = torch.linalg.solve(cov, torch.stack([i_star, i2]).T).T
    energies = (U * torch.stack([i_star, i2])).sum(-1)
    # a word leaning towards concept 0: 0.85 of its own direction, 0.6 of concept 1's, in s
    e = torch.linalg.lstsq(U, (torch.tensor([0.85, 0.6], dtype=torch.float64) * energies)[:, None]).solution.T
    s = (e @ U.T) / energies
    gates = torch.sigmoid((s - torch.tensor([0.9, 0.2], dtype=torch.float64)) / 0.15)
    assert torch.allclose(s, torch.tensor([[0.85, 0.6]], dtype=torch.float64), atol=1e-9)
    assert gates[0, 1] > gates[0, 0]  # the most open gate is concept 1's: the old rule would have picked it
    _, kept = edit.coefficients(e)
    assert kept[0, 1] == 0 and math.isclose(kept[0, 0], gates[0, 0].item(), rel_tol=1e-12)
