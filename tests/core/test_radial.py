"""Tests of localvol_fast.core.radial against mpmath (the reference is itself cross-checked against closed forms)."""

from __future__ import annotations

import itertools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localvol_fast.core import radial
from localvol_fast.core.radial import log_ball_volume, log_radial_integral, log_sphere_area

TOLERANCE = 1e-10  # |err| <= TOLERANCE * max(1, |log I|), the requirement


# ---------------------------------------------------------------- mpmath references


def reference_quad(n, a, b, r, dps=25, method="gauss-legendre"):
    """log int_0^r t^n exp(-a t^2/2 + b t) dt with mpmath.quad in x = log t.

    Centred at x_m = log min(r, t*) (t* the peak in x, of t^(n+1) exp(...)); G(d) = F(x_m + d) - F(x_m) is
    integrated over d in [-100, min(log r - x_m, 8)]: G(d) <= -(n+1)(e^d - 1 - d), so what lies beyond is
    below e^-99 of the peak. Breakpoints at 0 and +-8^k times the local width make every subinterval smooth.
    """
    with mp.workdps(dps):
        n, a, b = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        m = n + 1
        disc = mp.sqrt(b * b + 4 * a * m)
        t_peak = (b + disc) / (2 * a) if b >= 0 else 2 * m / (disc - b)
        finite = not math.isinf(r)
        t_m = mp.mpf(r) if (finite and mp.mpf(r) < t_peak) else t_peak
        quad_coef, lin_coef = a * t_m**2 / 2, b * t_m
        slope = m - 2 * quad_coef + lin_coef

        def integrand(d):
            return mp.exp(slope * d - quad_coef * (mp.expm1(2 * d) - 2 * d) + lin_coef * (mp.expm1(d) - d))

        width = 1 / (slope + mp.sqrt(2 * quad_coef + m + abs(lin_coef)))
        right_end = min(mp.log(mp.mpf(r) / t_m), mp.mpf(8)) if finite else mp.mpf(8)
        points = [mp.mpf(0)]
        step = width
        while step < 100:
            points.insert(0, -step)
            step *= 8
        points.insert(0, mp.mpf(-100))
        step = width
        while step < right_end:
            points.append(step)
            step *= 8
        if right_end > 0:
            points.append(right_end)
        return m * mp.log(t_m) - quad_coef + lin_coef + mp.log(mp.quad(integrand, points, method=method))


def reference_plain(n, a, b, r, dps=30):
    """The same integral in t itself (no log substitution), split at the peak; for moderate inputs only."""
    with mp.workdps(dps):
        n, a, b, r = (mp.mpf(v) for v in (n, a, b, r))
        log_f = lambda t: n * mp.log(t) - a * t * t / 2 + b * t
        peak = (b + mp.sqrt(b * b + 4 * a * n)) / (2 * a)
        top = log_f(min(max(peak, r * mp.mpf("1e-30")), r)) if peak > 0 else log_f(r * mp.mpf("1e-30"))
        points = [mp.mpf(0)] + [p for p in (peak / 2, peak, 2 * peak) if 0 < p < r] + [r]
        return top + mp.log(mp.quad(lambda t: mp.exp(log_f(t) - top), points))


def reference_infinite_radius(n, a, b, dps=30):
    """r = inf: Gamma(n+1) exp(beta^2/4) D_{-n-1}(-beta) a^(-(n+1)/2), beta = b / sqrt(a) (parabolic cylinder)."""
    with mp.workdps(dps):
        n, a, b = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        beta = b / mp.sqrt(a)
        return -(n + 1) / 2 * mp.log(a) + mp.loggamma(n + 1) + beta**2 / 4 + mp.log(mp.pcfd(-n - 1, -beta))


def reference_zero_b(n, a, r, dps=30):
    """b = 0: 2^((n-1)/2) Gamma((n+1)/2) a^(-(n+1)/2), times P((n+1)/2, a r^2 / 2) for finite r."""
    with mp.workdps(dps):
        n, a = mp.mpf(n), mp.mpf(a)
        s = (n + 1) / 2
        full = (n - 1) / 2 * mp.log(2) + mp.loggamma(s) - s * mp.log(a)
        if math.isinf(r):
            return full
        return full + mp.log(mp.gammainc(s, 0, a * mp.mpf(r) ** 2 / 2, regularized=True))


def reference_zero_n(a, b, r, dps=50):
    """n = 0: sqrt(pi / (2a)) exp(b^2 / (2a)) (erf(u) + erf(v)), u = (a r - b) / sqrt(2a), v = b / sqrt(2a).

    When one of u, v is negative the sum is the difference of two erfc's, which keeps its digits.
    """
    with mp.workdps(dps):
        a, b, r = mp.mpf(a), mp.mpf(b), mp.mpf(r)
        u, v = (a * r - b) / mp.sqrt(2 * a), b / mp.sqrt(2 * a)
        high, low = max(u, v), min(u, v)  # high + low = a r / sqrt(2a) > 0
        total = mp.erf(high) + mp.erf(low) if low >= 0 else mp.erfc(-low) - mp.erfc(high)
        return mp.log(mp.sqrt(mp.pi / (2 * a))) + b**2 / (2 * a) + mp.log(total)


def relative_error(got: float, reference) -> float:
    reference = float(reference)
    return abs(got - reference) / max(1.0, abs(reference))


def peak_and_scale(n: float, a: float, b: float) -> tuple[float, float]:
    """The peak t* = (b + sqrt(b^2 + 4 a n)) / (2a) of t^n exp(-a t^2/2 + b t), and max(t*, 1/sqrt(a))."""
    root = math.hypot(b, 2 * math.sqrt(a * n))
    peak = (b + root) / (2 * a) if b >= 0 else 2 * n / (root - b)
    return peak, max(peak, 1 / math.sqrt(a))


def evaluate(points) -> list[float]:
    columns = torch.tensor(points, dtype=torch.float64).T
    return log_radial_integral(*columns).tolist()


# ---------------------------------------------------------------- the reference is right


CROSS_CHECK_POINTS = [  # (n, a, b, r): moderate values where every closed form converges
    (0, 1.0, 0.0, math.inf),
    (1, 2.0, 3.0, math.inf),
    (10, 1.0, -5.0, math.inf),
    (2, 1e-2, -0.3, 40.0),
    (0, 1e4, 300.0, 1e-3),
    (3, 1.0, 0.0, 0.7),
    (40, 5.0, 2.0, 2.5),
    (4809, 0.512, -3.0, 90.0),
]


@pytest.mark.parametrize("n, a, b, r", CROSS_CHECK_POINTS)
def test_reference_agrees_with_independent_forms(n, a, b, r):
    log_space = reference_quad(n, a, b, r)
    other_rule = reference_quad(n, a, b, r, dps=35, method="tanh-sinh")
    assert abs(log_space - other_rule) < 1e-22 * max(1, abs(log_space))
    if not math.isinf(r):
        assert abs(log_space - reference_plain(n, a, b, r)) < 1e-20 * max(1, abs(log_space))
    if math.isinf(r) and n <= 10:
        assert abs(log_space - reference_infinite_radius(n, a, b)) < 1e-22 * max(1, abs(log_space))
    if b == 0:
        assert abs(log_space - reference_zero_b(n, a, r)) < 1e-22 * max(1, abs(log_space))
    if n == 0 and not math.isinf(r):
        assert abs(log_space - reference_zero_n(a, b, r)) < 1e-22 * max(1, abs(log_space))


# ---------------------------------------------------------------- accuracy against mpmath


N_VALUES = [0, 1, 2, 10, 4809, 1e4, 1e6, 1e8, 1e10]
BETA_VALUES = [-1e6, -1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4]  # b / sqrt(a)
A_VALUES = [1e-8, 1e-2, 1.0, 1e4, 1e12]
RADIUS_FACTORS = [1e-6, 1e-2, 0.5, 1.0, 1.2, 10.0, math.inf]  # times max(t*, 1/sqrt(a))


def accuracy_grid(n):
    points = []
    for i, beta in enumerate(BETA_VALUES):
        a = A_VALUES[(i + N_VALUES.index(n)) % len(A_VALUES)]  # every a meets every n and sign of b
        b = beta * math.sqrt(a)
        _, scale = peak_and_scale(n, a, b)
        points += [(n, a, b, factor * scale) for factor in RADIUS_FACTORS]
    return points


@pytest.mark.parametrize("n", N_VALUES)
def test_matches_mpmath_on_grid(n):
    points = accuracy_grid(n)
    for point, got in zip(points, evaluate(points)):
        error = relative_error(got, reference_quad(*point))
        assert error <= TOLERANCE, f"{point}: got {got!r}, relative error {error:.3g}"


@pytest.mark.parametrize(
    "n, a, b, r",
    [
        (0, 1.0, -1e6, 1e-7),  # strongly negative b: mass at t ~ 1/|b|
        (0, 1.0, -1e6, math.inf),
        (1e10, 1.0, -1e6, 1e5),
        (2, 4.0, 2e6, 1e-6),  # strongly positive b, r far below the peak
        (2, 4.0, 2e6, math.inf),
        (1e10, 1e12, 0.0, 1e-6),  # peak at 0.1, r far below it: n log r dominates
        (0, 1e-8, 1e-4, 1e8),
        (7, 1e12, -3e12, 1e-12),
        (1e8, 1e-8, -1.0, 1e-3),
        # far outside the realistic ranges, still finite and exact
        (1, 5e-324, 0.0, 1.0),
        (0.5, 1e300, -1.0, 1e300),
        (1e10, 1e12, 1e6, 1.7e308),
        (4809, 1e-300, 1e6, 1e-8),
        (1e15, 1.0, -1e100, 1e-90),
        (0, 1e-8, 1e150, 1e-160),
    ],
)
def test_matches_mpmath_at_extremes(n, a, b, r):
    got = evaluate([(n, a, b, r)])[0]
    error = relative_error(got, reference_quad(n, a, b, r))
    assert error <= TOLERANCE, f"got {got!r}, relative error {error:.3g}"


def test_digits_mlp_regime_where_the_research_code_failed():
    """D = 4,810 (n = 4809), sigma^2 = 1 / (lambda N) = 1/0.512: radii far below and far above the peak."""
    n, a = 4809.0, 0.512
    points = []
    for b in [-40.0, -3.0, 0.0, 2.5, 40.0]:
        peak, _ = peak_and_scale(n, a, b)
        points += [(n, a, b, peak * f) for f in (1e-4, 1e-2, 0.1, 0.8, 0.99, 1.01, 3.0, 100.0)]
    for point, got in zip(points, evaluate(points)):
        assert relative_error(got, reference_quad(*point)) <= TOLERANCE, point


@pytest.mark.parametrize("n", [0, 1, 2, 10, 4809, 1e6, 1e10])
def test_zero_b_closed_form(n):
    # (mpmath's gammainc does not converge for huge n with a r^2/2 close to (n+1)/2; the grid covers that.)
    factors = (1e-6, 0.3, 1.0, 3.0) if n <= 1e6 else (1e-6, 0.3, 0.9, 3.0)
    points = [(n, a, 0.0, f * math.sqrt((n + 1) / a)) for a in (1e-8, 1.0, 1e12) for f in factors]
    points += [(n, a, 0.0, math.inf) for a in (1e-8, 1.0, 1e12)]
    for point, got in zip(points, evaluate(points)):
        n_, a, _, r = point
        assert relative_error(got, reference_zero_b(n_, a, r)) <= TOLERANCE, point


def test_zero_n_closed_form():
    points = [
        (0, a, beta * math.sqrt(a), f / math.sqrt(a))
        for a in (1e-4, 1.0, 1e6)
        for beta in (-300.0, -2.0, 0.5, 300.0)
        for f in (1e-5, 0.5, 4.0, 1e3)
    ]
    for point, got in zip(points, evaluate(points)):
        _, a, b, r = point
        assert relative_error(got, reference_zero_n(a, b, r)) <= TOLERANCE, point


# ---------------------------------------------------------------- robustness


def test_never_nan_on_an_extreme_grid():
    ns = [0, 1e-300, 0.5, 1, 4809, 1e10, 1e15, 1e100, 1e300, 1.7e308]
    as_ = [5e-324, 1e-300, 1e-8, 1, 1e12, 1e300, 1.7e308]
    bs = [-1.7e308, -1e300, -1e100, -1e6, -1, -5e-324, 0, 1e-300, 1, 1e6, 1e100, 1e300, 1.7e308]
    rs = [5e-324, 1e-300, 1e-8, 1, 1e8, 1e300, 1.7e308, math.inf]
    columns = torch.tensor(list(itertools.product(ns, as_, bs, rs)), dtype=torch.float64).T
    out = log_radial_integral(*columns)
    assert out.dtype == torch.float64
    assert not torch.isnan(out).any()
    # Inputs of ordinary size give finite values.
    ordinary = (columns[0] <= 1e15) & (columns[1] >= 1e-8) & (columns[1] <= 1e12) & (columns[2].abs() <= 1e6)
    ordinary &= (columns[3] >= 1e-8) & (columns[3] <= 1e8)
    assert torch.isfinite(out[ordinary]).all()


finite_floats = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, 20).map(float), st.floats(0, 1e15), st.floats(0, 1.7e308)),
            st.floats(1e-300, 1e300),
            st.one_of(st.floats(-1e8, 1e8), finite_floats),
            st.one_of(st.floats(1e-300, 1e300), st.just(math.inf), st.floats(min_value=5e-324, max_value=1e308)),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_never_raises_nor_nan_on_random_valid_inputs(points):
    points = [(n, a, b, r) for n, a, b, r in points if a > 0 and r > 0]
    if not points:
        return
    out = log_radial_integral(*torch.tensor(points, dtype=torch.float64).T)
    assert not torch.isnan(out).any()


@settings(max_examples=60, deadline=None)
@given(
    n=st.one_of(st.integers(0, 30).map(float), st.floats(0, 1e10)),
    log_a=st.floats(-8, 12),
    beta=st.floats(-1e4, 1e4),
)
def test_monotone_in_r(n, log_a, beta):
    a = 10.0**log_a
    b = beta * math.sqrt(a)
    _, scale = peak_and_scale(n, a, b)
    radii = torch.cat([scale * torch.logspace(-6, 1.5, 200, dtype=torch.float64), torch.tensor([math.inf])])
    out = log_radial_integral(n, a, b, radii)
    assert torch.isfinite(out).all()
    steps = out.diff()
    assert (steps >= -1e-13 * out[1:].abs().clamp(min=1)).all(), steps.min()


def test_broadcasting_dtypes_and_devices():
    n = torch.tensor([[0.0], [10.0], [4809.0]], dtype=torch.float32)  # (3, 1)
    b = np.array([-1.0, 0.0, 2.0, 5.0])  # (4,)
    r = torch.tensor([0.5, 1.0, 3.0, math.inf], dtype=torch.float16).double()
    out = log_radial_integral(n, 2.0, b, r)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    for i, j in itertools.product(range(3), range(4)):
        single = log_radial_integral(float(n[i, 0]), 2.0, float(b[j]), float(r[j]))
        assert single.shape == () and float(single) == pytest.approx(float(out[i, j]), rel=1e-14, abs=1e-14)
    assert log_radial_integral(torch.empty(0), 1.0, 0.0, 1.0).shape == (0,)
    assert log_radial_integral(1.0, 1.0, 0.0, torch.ones(2, 0, 3)).shape == (2, 0, 3)
    # float32 input is converted exactly, then computed in float64.
    low = log_radial_integral(torch.tensor([3.0], dtype=torch.float32), torch.tensor([0.1], dtype=torch.bfloat16), 0, 2)
    assert low.dtype == torch.float64


def test_chunking_gives_the_same_values(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    size = 1000
    n = torch.randint(0, 10**6, (size,), generator=generator).double()
    a = 10 ** (torch.rand(size, generator=generator, dtype=torch.float64) * 8 - 4)
    b = torch.randn(size, generator=generator, dtype=torch.float64) * 100 * a.sqrt()
    r = 10 ** (torch.rand(size, generator=generator, dtype=torch.float64) * 8 - 4)
    whole = log_radial_integral(n, a, b, r)
    monkeypatch.setattr(radial, "_CHUNK", 37)
    monkeypatch.setattr(radial, "_QUADRATURE_ROWS", 10)
    chunked = log_radial_integral(n.reshape(10, 100), a.reshape(10, 100), b.reshape(10, 100), r.reshape(10, 100))
    torch.testing.assert_close(whole, chunked.reshape(-1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    "args, name, value",  # args = (n, a, b, r)
    [
        ((1.0, 0.0, 0.0, 1.0), "a", "0.0"),
        ((1.0, -2.5, 0.0, 1.0), "a", "-2.5"),
        ((-1.0, 1.0, 0.0, 1.0), "n", "-1.0"),
        ((1.0, 1.0, 0.0, 0.0), "r", "0.0"),
        ((1.0, 1.0, 0.0, -3.0), "r", "-3.0"),
        ((math.nan, 1.0, 0.0, 1.0), "n", "nan"),
        ((1.0, math.nan, 0.0, 1.0), "a", "nan"),
        ((1.0, 1.0, math.nan, 1.0), "b", "nan"),
        ((1.0, 1.0, 0.0, math.nan), "r", "nan"),
        ((math.inf, 1.0, 0.0, 1.0), "n", "inf"),
        ((1.0, math.inf, 0.0, 1.0), "a", "inf"),
        ((1.0, 1.0, -math.inf, 1.0), "b", "-inf"),
    ],
)
def test_invalid_input_raises_value_error_naming_it(args, name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b.*must be.*{name}={value}"):
        log_radial_integral(*args)


def test_invalid_element_in_a_tensor_is_located():
    a = torch.ones(2, 3, dtype=torch.float64)
    a[1, 2] = -1.0
    with pytest.raises(ValueError, match=r"a=-1\.0 at index \(1, 2\)"):
        log_radial_integral(5.0, a, 0.0, 1.0)


# ---------------------------------------------------------------- sphere area and ball volume


@pytest.mark.parametrize("D", [1, 2, 3, 10, 4810, 30_494_720, 1e12])
def test_sphere_area_and_ball_volume(D):
    with mp.workdps(40):
        area = mp.log(2) + mp.mpf(D) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(D) / 2)
        volume = mp.mpf(D) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(D) / 2 + 1)
    assert relative_error(log_sphere_area(D), area) <= 1e-13
    assert relative_error(log_ball_volume(D), volume) <= 1e-13
    assert abs(log_sphere_area(D) - math.log(D) - log_ball_volume(D)) <= 1e-12 * max(1, abs(log_sphere_area(D)))


def test_sphere_area_and_ball_volume_small_cases():
    assert log_sphere_area(2) == pytest.approx(math.log(2 * math.pi), rel=1e-15)
    assert log_sphere_area(3) == pytest.approx(math.log(4 * math.pi), rel=1e-15)
    assert log_ball_volume(3) == pytest.approx(math.log(4 * math.pi / 3), rel=1e-15)
    with pytest.raises(ValueError, match="D"):
        log_sphere_area(0)
