"""Property-based tests (hypothesis) of the math: the radial integral, log-mean-exp, lossless results,
the Adam preconditioner, exact volumes of quadratic and zero costs, and the radius search.

Every test runs a bounded, derandomized set of examples (the same ones on every run and machine) with
no deadline and no example database, so CI sees the same inputs each time and nothing is written to
the tree. Reference values come from closed forms or from mpmath at 30 digits.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import localvol_fast as lv
from localvol_fast import (
    VolumeResult,
    adam_preconditioner,
    log_mean_exp,
    log_radial_integral,
)
from localvol_fast.core.search import CONVERGED, STATUS_NAMES, search_radii


def bounded(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def log_uniform(lo: float, hi: float):
    """Floats spread evenly in log10 between lo and hi."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def peak(n: float, a: float, b: float) -> float:
    """t* = (b + sqrt(b^2 + 4 a (n + 1))) / (2a), the maximum of t^(n+1) exp(-a t^2/2 + b t) (MATH.md)."""
    m = n + 1.0
    hyp = math.hypot(b / 2.0, math.sqrt(a) * math.sqrt(m))
    return (b / 2.0 + hyp) / a if b >= 0 else m / (hyp - b / 2.0)


def lri(n, a, b, r) -> torch.Tensor:
    return log_radial_integral(n, a, b, r)


# --------------------------------------------------------------------------------------------------
# log_radial_integral(n, a, b, r) = log integral_0^r t^n exp(-a t^2 / 2 + b t) dt
# --------------------------------------------------------------------------------------------------
exponents = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 9.0, 4809.0, 30_494_719.0]),
    log_uniform(1e-3, 1e10),
)
curvatures = log_uniform(1e-8, 1e8)
skews = st.floats(-60.0, 60.0)  # b in units of sqrt(a (n + 1)): both signs, far beyond the peak's width


@bounded(120)
@given(n=exponents, a=curvatures, skew=skews, offsets=st.lists(st.floats(-40.0, 8.0), min_size=2, max_size=12))
@example(n=0.0, a=1.0, skew=0.0, offsets=[-40.0, 8.0])
@example(n=1e10, a=1e-8, skew=-60.0, offsets=[-1e-9, 0.0, 1e-9])
def test_radial_integral_is_finite_and_monotone_in_r(n, a, skew, offsets):
    b = skew * math.sqrt(a * (n + 1.0))
    t_star = peak(n, a, b)
    radii = sorted({t_star * math.exp(u) for u in offsets})
    assume(all(0 < r < math.inf for r in radii))
    values = lri(n, a, b, torch.tensor([*radii, math.inf], dtype=torch.float64))
    assert values.dtype == torch.float64
    assert not bool(torch.isnan(values).any())
    assert bool(torch.isfinite(values).all()), values
    tolerance = 1e-12 * values.abs().clamp_min(1.0)
    assert bool((values[1:] >= values[:-1] - tolerance[1:]).all()), values  # r -> I(r) never decreases


@bounded(50)
@given(
    n=st.sampled_from([0.0, 1.0, 2.0, 5.0, 20.0, 200.0, 1000.0]),
    a=log_uniform(1e-3, 1e3),
    skew=st.floats(-5.0, 5.0),
    lo=st.floats(-6.0, 1.5),
    span=st.floats(1e-3, 6.0),
)
def test_radial_integral_is_additive(n, a, skew, lo, span):
    """I(0..r2) = I(0..r1) + I(r1..r2), the middle part from mpmath; checked as
    logaddexp(I(r1), log middle) = I(r2), which stays exact however small the middle part is."""
    b = skew * math.sqrt(a * (n + 1.0))
    t_star = peak(n, a, b)
    r1, r2 = t_star * math.exp(lo), t_star * math.exp(lo + span)
    i1, i2 = (float(v) for v in lri(n, a, b, torch.tensor([r1, r2], dtype=torch.float64)))

    with mpmath.workdps(30):
        def log_f(t):
            return n * mpmath.log(t) - a * t * t / 2 + b * t

        centre = min(max(t_star, r1), r2)
        shift = log_f(mpmath.mpf(centre))
        width = 1.0 / math.sqrt(a + n / (t_star * t_star))
        cuts = [centre + k * width for k in (-8, -3, -1, 0, 1, 3, 8)]
        points = sorted({r1, r2, *(c for c in cuts if r1 < c < r2)})
        middle = mpmath.quad(lambda t: mpmath.exp(log_f(t) - shift), points)
        total = mpmath.log(mpmath.exp(mpmath.mpf(i1) - shift) + middle) + shift
    assert float(total) == pytest.approx(i2, rel=1e-12, abs=1e-12)


@bounded(150)
@given(
    n=exponents,
    a=curvatures,
    skew=skews,
    offset=st.one_of(st.floats(-30.0, 6.0), st.just(math.inf)),
    scale_exponent=st.floats(-6.0, 6.0),
)
def test_radial_integral_scaling_identity(n, a, skew, offset, scale_exponent):
    """t = c s:  I(n, a, b, r) = (n + 1) log c + I(n, a c^2, b c, r / c)."""
    b = skew * math.sqrt(a * (n + 1.0))
    t_star = peak(n, a, b)
    r = t_star * math.exp(offset) if math.isfinite(offset) else math.inf
    assume(r > 0)
    c = 10.0**scale_exponent
    left = float(lri(n, a, b, r))
    right = (n + 1.0) * math.log(c) + float(lri(n, a * c * c, b * c, r / c))
    # One rounding in each of a c^2, b c and r / c moves log I by ~ eps (n + 1 + a t^2 + |b t|).
    t_m = min(r, t_star)
    sensitivity = abs(left) + n + 1.0 + a * t_m * t_m + abs(b * t_m)
    assert abs(left - right) <= 1e-12 * sensitivity
    # A power-of-two scale rounds nothing: the identity then holds to the integral's own accuracy.
    c2 = 2.0 ** round(scale_exponent * 3.3)
    right2 = (n + 1.0) * math.log(c2) + float(lri(n, a * c2 * c2, b * c2, r / c2))
    assert right2 == pytest.approx(left, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# log_mean_exp
# --------------------------------------------------------------------------------------------------
finite_logs = st.floats(-700.0, 700.0, allow_nan=False)
value_lists = st.lists(finite_logs, min_size=1, max_size=60)


@bounded(200)
@given(values=value_lists, shift=st.floats(-1e4, 1e4))
def test_log_mean_exp_is_shift_invariant(values, shift):
    x = torch.tensor(values, dtype=torch.float64)
    base = log_mean_exp(x)
    scale = max(abs(shift), float(x.abs().max()), 1.0)
    assert log_mean_exp(x + shift) == pytest.approx(base + shift, rel=0, abs=1e-12 * scale)


@bounded(200)
@given(values=value_lists)
def test_log_mean_exp_lies_between_the_mean_and_the_max(values):
    x = torch.tensor(values, dtype=torch.float64)
    value = log_mean_exp(x)
    slack = 1e-12 * max(float(x.abs().max()), 1.0)
    assert float(x.mean()) - slack <= value <= float(x.max()) + slack  # Jensen, and mean <= max
    assert value >= float(x.max()) - math.log(len(values)) - slack  # one term alone carries 1/n of the mass
    if len(set(values)) == 1:
        assert value == pytest.approx(values[0], rel=0, abs=slack)


@bounded(150)
@given(values=value_lists, data=st.data())
def test_log_mean_exp_is_permutation_invariant(values, data):
    permuted = data.draw(st.permutations(values))
    x, y = torch.tensor(values, dtype=torch.float64), torch.tensor(permuted, dtype=torch.float64)
    assert log_mean_exp(y) == pytest.approx(log_mean_exp(x), rel=0, abs=1e-12 * max(float(x.abs().max()), 1.0))


@bounded(60)
@given(values=st.lists(st.floats(-1e300, 1e300), min_size=0, max_size=20), extra=st.sampled_from([math.inf, -math.inf]))
def test_log_mean_exp_infinities(values, extra):
    with_inf = torch.tensor([*values, extra], dtype=torch.float64)
    if extra > 0:
        assert log_mean_exp(with_inf) == math.inf  # any +inf wins
    elif values:  # a -inf adds no mass but counts: log(mean) drops by log((n + 1) / n)
        x = torch.tensor(values, dtype=torch.float64)
        want = log_mean_exp(x) - math.log((len(values) + 1) / len(values))
        assert log_mean_exp(with_inf) == pytest.approx(want, rel=1e-12, abs=1e-12)
    else:
        assert log_mean_exp(with_inf) == -math.inf
    assert log_mean_exp(torch.full((len(values) + 1,), -math.inf, dtype=torch.float64)) == -math.inf
    assert log_mean_exp(torch.empty(0, dtype=torch.float64)) == -math.inf


# --------------------------------------------------------------------------------------------------
# VolumeResult: lossless JSON for any floats, inf and NaN included
# --------------------------------------------------------------------------------------------------
any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
json_scalars = st.one_of(any_float, st.integers(-(2**62), 2**62), st.booleans(), st.text(max_size=8), st.none())
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def volume_results(draw):
    n = draw(st.integers(0, 8))
    floats = lambda: torch.tensor(draw(st.lists(any_float, min_size=n, max_size=n)), dtype=torch.float64)
    ints = lambda: torch.tensor(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)),
                                dtype=torch.int64)
    return VolumeResult(
        estimates=floats(),
        radii=floats(),
        deltas=floats(),
        props=floats(),
        status=draw(st.lists(st.sampled_from(STATUS_NAMES), min_size=n, max_size=n)),  # load refuses others
        n_evals=ints(),
        indices=ints(),
        nonmonotone=torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool),
        dim=draw(st.integers(1, 2**62)),
        cutoff=draw(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_subnormal=True)),
        measure=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
        config=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
        info=draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    )


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal dtype and shape, and equal bits (so -0.0 differs from 0.0) except that NaN matches NaN."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_floating_point():
        nan_x, nan_y = torch.isnan(x), torch.isnan(y)
        if not torch.equal(nan_x, nan_y):
            return False
        x, y = x[~nan_x], y[~nan_y]
        return torch.equal(x.view(torch.int64), y.view(torch.int64))
    return torch.equal(x, y)


def _same_json(x, y) -> bool:
    """Equal as JSON (NaN and floats compared through their shortest repr: exact)."""
    return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


@bounded(120)
@given(result=volume_results())
def test_volume_result_json_round_trip_is_exact(result):
    text = json.dumps(result.to_dict(), indent=1)
    loaded = VolumeResult.from_dict(json.loads(text))
    with tempfile.TemporaryDirectory() as folder:
        from_file = VolumeResult.load(result.save(Path(folder) / "r.json"))
    for back in (loaded, from_file):
        for name in ("estimates", "radii", "deltas", "props", "n_evals", "indices", "nonmonotone"):
            assert _same_tensor(getattr(back, name), getattr(result, name)), name
        assert back.status == result.status and back.dim == result.dim
        assert _same_json(back.cutoff, result.cutoff)
        for name in ("measure", "config", "info"):
            assert _same_json(getattr(back, name), getattr(result, name)), name
        assert _same_json(back.log_volume, result.log_volume)


# --------------------------------------------------------------------------------------------------
# adam_preconditioner: p_i = 1 / (v_i^exponent + eps), normalized to mean(log p) = 0
# --------------------------------------------------------------------------------------------------
@bounded(150)
@given(
    moments=st.lists(log_uniform(1e-30, 1e30), min_size=1, max_size=200),
    exponent=st.floats(0.05, 2.0),
    eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-5, 1.0]),
)
def test_adam_preconditioner_is_normalized_float64(moments, exponent, eps):
    v = torch.tensor(moments, dtype=torch.float64)
    p = adam_preconditioner(v, exponent=exponent, eps=eps)
    assert p.dtype == torch.float64 and p.shape == v.shape
    assert bool(torch.isfinite(p).all()) and bool((p > 0).all())
    logs = torch.log(p)
    assert abs(float(logs.mean())) <= 1e-13 * max(float(logs.abs().max()), 1.0)
    # proportional to 1 / (v^exponent + eps): the products are all the same constant
    product = torch.log(p) + torch.log(v.pow(exponent) + eps)
    assert float(product.max() - product.min()) <= 1e-12 * max(float(product.abs().max()), 1.0) + 1e-13 * len(moments)


@bounded(100)
@given(
    moments=st.lists(log_uniform(1e-20, 1e20), min_size=1, max_size=200),
    eps=st.sampled_from([1e-8, 1e-5, 1e-3]),
)
def test_adam_preconditioner_is_normalized_float32(moments, eps):
    """float32 moments (what Adam keeps) give a float32 preconditioner, normalized up to its rounding."""
    v = torch.tensor(moments, dtype=torch.float32)
    p = adam_preconditioner(v, eps=eps)
    assert p.dtype == torch.float32 and bool((p > 0).all()) and bool(torch.isfinite(p).all())
    assert abs(float(torch.log(p.double()).mean())) <= 1e-6


@bounded(40)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_adam_preconditioner_from_an_optimizer_and_its_state_dict(shapes, seed):
    """The same normalized preconditioner from the optimizer, its state_dict, or the raw moments."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    opt = torch.optim.Adam(params)
    sum(((p * torch.randn(p.shape, generator=gen)) ** 2).sum() for p in params).backward()
    opt.step()
    moments = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    from_tensor = adam_preconditioner(moments)
    assert torch.equal(adam_preconditioner(opt), from_tensor)
    assert torch.equal(adam_preconditioner(opt.state_dict(), params=params), from_tensor)
    assert abs(float(torch.log(from_tensor.double()).mean())) <= 1e-6


def test_adam_preconditioner_normalizes_before_rounding_to_float32():
    # 1 / v^2 = [1e60, 1e56] leaves the float32 range; normalized (geometric mean 1e58) it is [100, 0.01].
    p = adam_preconditioner(torch.tensor([1e-30, 1e-28], dtype=torch.float32), exponent=2.0, eps=0.0)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([100.0, 0.01]), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Exact volumes
# --------------------------------------------------------------------------------------------------
@bounded(40)
@given(
    dim=st.integers(1, 50),
    seed=st.integers(0, 2**16),
    log_h_range=st.floats(0.0, 6.0),
    cutoff=log_uniform(1e-6, 1e2),
)
@example(dim=1, seed=0, log_h_range=0.0, cutoff=1e-2)
@example(dim=50, seed=1, log_h_range=6.0, cutoff=1e-6)
def test_uniform_volume_of_a_quadratic_with_the_exact_preconditioner_is_the_closed_form(dim, seed, log_h_range, cutoff):
    """C = (1/2) sum h_i (theta - theta0)_i^2: S is an ellipsoid of volume V_D prod sqrt(2 eps / h_i),
    and with P = h^(-1/2) every direction returns exactly that (MATH.md, importance sampling)."""
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(dim, generator=gen, dtype=torch.float64)
    h = 10.0 ** ((torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5) * log_h_range)

    def cost(thetas):
        return 0.5 * ((thetas - anchor) ** 2 * h).sum(1)

    closed_form = lv.log_ball_volume(dim) + 0.5 * dim * math.log(2 * cutoff) - 0.5 * float(torch.log(h).sum())
    result = lv.estimate_volume(cost, anchor, cutoff=cutoff, n_samples=6, measure="uniform", preconditioner=h**-0.5,
                                seed=seed)
    assert result.status == [CONVERGED] * 6
    torch.testing.assert_close(result.estimates, torch.full((6,), closed_form, dtype=torch.float64),
                               rtol=0, atol=1e-9 * dim + 1e-9)
    assert result.log_volume == pytest.approx(closed_form, rel=0, abs=1e-9 * dim + 1e-9)


# Every direction of a zero cost is "unbounded", which the estimator reports in one RuntimeWarning.
_UNBOUNDED_WARNING = pytest.mark.filterwarnings("ignore:local volume. of .* unbounded:RuntimeWarning")


def _zero_cost(thetas):
    return torch.zeros(thetas.shape[0], dtype=torch.float64)


@_UNBOUNDED_WARNING
@bounded(40)
@given(dim=st.integers(1, 50), sigma=log_uniform(1e-4, 1e4), seed=st.integers(0, 2**16))
def test_gaussian_volume_of_everything_is_one(dim, sigma, seed):
    """C identically 0: every ray is inside to r = inf, and the N(0, sigma^2 I) mass of the whole space
    is 1, direction by direction (zero anchor: each ray's integral is the same)."""
    anchor = torch.zeros(dim, dtype=torch.float64)
    result = lv.estimate_volume(_zero_cost, anchor, cutoff=1e-2, n_samples=5, sigma=sigma, seed=seed)
    assert result.status == ["unbounded"] * 5
    assert bool(torch.isinf(result.radii).all())
    torch.testing.assert_close(result.estimates, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-10 * dim + 1e-12)


@_UNBOUNDED_WARNING
@bounded(30)
@given(dim=st.integers(1, 50), seed=st.integers(0, 2**16), log_range=st.floats(0.0, 4.0))
def test_gaussian_volume_of_everything_is_one_with_per_parameter_sigma(dim, seed, log_range):
    """The same with a per-parameter sigma and the matching preconditioner P = sigma (then, and only
    then, every direction's estimate is exactly log 1 = 0, not just their mean)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 10.0 ** ((torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5) * log_range)
    anchor = torch.zeros(dim, dtype=torch.float64)
    result = lv.estimate_volume(_zero_cost, anchor, cutoff=1e-2, n_samples=5, sigma=sigma, preconditioner=sigma,
                                seed=seed)
    assert result.status == ["unbounded"] * 5
    torch.testing.assert_close(result.estimates, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-10 * dim + 1e-12)


# --------------------------------------------------------------------------------------------------
# The radius search on power laws C(t) = s t^k
# --------------------------------------------------------------------------------------------------
@bounded(120)
@given(
    exponents=st.lists(st.floats(0.3, 15.0), min_size=1, max_size=16),
    data=st.data(),
    cutoff=log_uniform(1e-8, 1e4),
    rtol=st.sampled_from([1e-3, 1e-2, 0.1]),
)
def test_search_finds_power_law_crossings_exactly(exponents, data, cutoff, rtol):
    """C = s t^k crosses eps at r = (eps / s)^(1/k). Once the search has two probes its log-log slope is
    exactly k, so the radius is exact to rounding; it converges within rtol always, in few evaluations."""
    n = len(exponents)
    k = torch.tensor(exponents, dtype=torch.float64)
    s = torch.tensor(data.draw(st.lists(log_uniform(1e-12, 1e12), min_size=n, max_size=n)), dtype=torch.float64)
    first = torch.tensor(data.draw(st.lists(log_uniform(1e-3, 1e3), min_size=n, max_size=n)), dtype=torch.float64)
    exact = (cutoff / s) ** (1.0 / k)

    def evaluate(rows, radii):
        return s[rows] * radii ** k[rows]

    out = search_radii(evaluate, first, torch.full((n,), math.inf, dtype=torch.float64), cutoff, rtol=rtol)
    assert out.status == [CONVERGED] * n
    assert not bool(out.nonmonotone.any())
    relative = (out.radii / exact - 1.0).abs()
    # within rtol: |C(r) - eps| <= rtol eps, i.e. |log r - log r*| <= log(1 + rtol) / k (+ rounding)
    assert bool((relative <= torch.expm1(math.log1p(rtol) / k) + 1e-12).all())
    measured = out.n_evals >= 2
    assert bool((relative[measured] <= 1e-9).all()), (relative, out.n_evals)
    torch.testing.assert_close(out.slopes[measured], k[measured], rtol=1e-9, atol=0)
    assert int(out.n_evals.max()) <= 20


@pytest.mark.parametrize("k", [1.0, 4.0])
def test_search_is_exact_when_the_first_probe_is_already_within_rtol(k):
    """A first probe within rtol converges at once; with no slope measured yet the radius is moved onto
    eps along the slope hint (the estimator passes the pilot's typical slope). Exact when the hint is
    the cost's slope; otherwise off by at most log(1 + rtol) |1/k - 1/hint| in log r (documented)."""
    cutoff, factor = 1e-2, 1.009  # C(1) = 1.009 eps: within rtol = 1e-2 at the first probe
    for hint in (k, 2.0):
        out = search_radii(lambda rows, radii: cutoff * factor * radii**k, torch.ones(1, dtype=torch.float64),
                           torch.full((1,), math.inf, dtype=torch.float64), cutoff, slope_hint=hint)
        assert out.status == [CONVERGED] and int(out.n_evals[0]) == 1
        error = abs(math.log(float(out.radii[0])) + math.log(factor) / k)
        assert error <= math.log(1 + 1e-2) * abs(1 / k - 1 / hint) + 1e-12
