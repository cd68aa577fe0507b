"""The batched radius search on costs along rays C(t) with known crossings."""

import math

import torch

from localvol_fast.core.search import search_radii


def _run(cost_of_t, n, cutoff=1e-2, initial=1.0, cap=math.inf, **kw):
    """Search where row k's cost at radius t is cost_of_t(k, t) (vectorized over rows)."""
    calls = []

    def evaluate(rows, radii):
        calls.append(rows.numel())
        return cost_of_t(rows, radii)

    out = search_radii(
        evaluate,
        torch.full((n,), float(initial), dtype=torch.float64),
        torch.full((n,), float(cap), dtype=torch.float64),
        cutoff,
        **kw,
    )
    return out, calls


def test_power_laws_converge_to_the_exact_radius():
    # C = k_i t^p_i: the crossing is (eps / k)^(1/p); log-log interpolation makes it exact.
    k = torch.logspace(-6, 6, 25, dtype=torch.float64)
    p = torch.linspace(1.0, 4.0, 25, dtype=torch.float64)
    out, _ = _run(lambda rows, t: k[rows] * t ** p[rows], 25)
    truth = (1e-2 / k) ** (1 / p)
    assert out.status == ["converged"] * 25
    torch.testing.assert_close(out.radii, truth, rtol=1e-12, atol=0)
    assert ((out.deltas - 1e-2).abs() <= 1e-2 * 1e-2).all()
    assert (out.n_evals <= 8).all()


def test_quadratic_needs_few_evaluations_from_a_good_start():
    h = torch.logspace(-2, 2, 50, dtype=torch.float64)
    out, calls = _run(lambda rows, t: 0.5 * h[rows] * t * t, 50, initial=0.3)
    assert float(out.n_evals.double().mean()) <= 3.0
    assert calls[0] == 50 and calls == sorted(calls, reverse=True)  # converged rows leave the batch


def test_non_quadratic_rtol_is_respected():
    f = lambda rows, t: torch.expm1(t * (1 + rows.double())) ** 3  # noqa: E731
    out, _ = _run(f, 6, rtol=1e-3)
    assert out.status == ["converged"] * 6
    truth = torch.log1p(torch.full((6,), 1e-2) ** (1 / 3)).double() / (1 + torch.arange(6).double())
    torch.testing.assert_close(out.radii, truth, rtol=1e-6, atol=0)


def test_never_reaching_the_cutoff_is_unbounded_at_the_cap():
    out, _ = _run(lambda rows, t: 1e-3 * (1 - torch.exp(-t)), 3, cap=50.0)
    assert out.status == ["unbounded"] * 3
    assert (out.radii == 50.0).all()


def test_nan_and_inf_costs_count_as_outside():
    # Finite and small up to t = 2, NaN beyond: the neighborhood ends at the NaN boundary.
    f = lambda rows, t: torch.where(t < 2.0, 1e-4 * t, torch.full_like(t, math.nan))  # noqa: E731
    out, _ = _run(f, 2)
    assert out.status == ["nonfinite"] * 2
    torch.testing.assert_close(out.radii, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-9, atol=0)
    g = lambda rows, t: torch.where(t < 0.5, 0.02 * t * t, torch.full_like(t, math.inf))  # noqa: E731
    out, _ = _run(g, 2)  # crossing at 0.5 exactly, where the cost jumps to inf
    assert out.status == ["nonfinite"] * 2
    h = lambda rows, t: torch.where(t < 0.3, 0.5 * t * t, torch.full_like(t, math.nan))  # noqa: E731
    out, _ = _run(h, 2)  # a real crossing (t = 0.1414) before the NaN region
    assert out.status == ["converged"] * 2
    torch.testing.assert_close(out.radii, torch.full((2,), math.sqrt(0.02), dtype=torch.float64), rtol=1e-9, atol=0)


def test_jump_over_the_cutoff():
    f = lambda rows, t: torch.where(t < 1.5, 1e-3 * t, 1.0 + t)  # noqa: E731
    out, _ = _run(f, 1)
    assert out.status == ["jump"]
    assert abs(float(out.radii[0]) - 1.5) < 1e-9


def test_non_monotone_cost_is_flagged_and_a_crossing_is_found():
    # Rises to 0.009 at t=1, dips to 0.001 at t=2, then crosses eps = 0.01 at t = 2 + sqrt(0.45).
    def f(rows, t):
        rise, dip, climb = 0.009 * t, 0.009 - 0.008 * (t - 1), 0.001 + 0.02 * (t - 2) ** 2
        return torch.where(t <= 1, rise, torch.where(t <= 2, dip, climb))

    out, _ = _run(f, 1, initial=0.5)
    assert out.status == ["converged"]
    assert bool(out.nonmonotone[0])
    assert abs(float(out.radii[0]) - (2 + math.sqrt(0.45))) < 1e-3


def test_budget_exhaustion_is_reported():
    f = lambda rows, t: 0.5 * t * t  # noqa: E731
    out, _ = _run(f, 2, initial=1e-30, max_evals=3)
    assert out.status == ["not_converged"] * 2
    assert (out.n_evals == 3).all()
