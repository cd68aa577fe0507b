"""Ground-truth log volumes (core/ground_truth.py, core/separable.py) against independent truths:
brute-force Monte Carlo, scipy's non-central chi-square CDF, mpmath/scipy quadrature, closed forms."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from localvol_fast.core.ground_truth import (
    GroundTruth,
    lebesgue_log_volume,
    quadratic_log_volume,
    tilted_log_volume,
)
from localvol_fast.core.separable import _problem, separable_cgf, separable_log_volume

# Accuracy of the deterministic formulas, measured (isotropic chi-square against scipy; 24 random spectra,
# D = 2..10, against 400,000 tilted samples; eps from 1e-5 to 50% of the prior mean), in terms of the
# effective dimension D_eff = 8 / rho3^2 (rho3 the tilted law's skewness; D_eff = D for a central
# isotropic chi-square): Lugannani-Rice errs by at most 0.16 / D_eff nats (0.072 at D = 2 isotropic: its
# limit as eps -> 0 is Stirling's error for Gamma(D/2 + 1)), the tests allow 0.33 / D_eff; with Daniels'
# second-order term by at most 0.055 / D_eff (0.0094 at D = 2 isotropic, 4e-4 at D = 10), the tests
# allow 0.1 / D_eff. The density-to-tail saddlepoint formula is high by about -log(|u| R(|u|)) ~ 1/u^2
# nats (u = s sqrt(K''(s)), R the Mills ratio: its exact error when C is Gaussian): it needs u^2 >> 1.


def effective_dimension(second_order: GroundTruth) -> float:
    return 8.0 / second_order.details["rho3"] ** 2


def lugannani_rice_allowance(second_order: GroundTruth) -> float:
    return 0.33 / effective_dimension(second_order)


def second_order_allowance(second_order: GroundTruth) -> float:
    return 0.1 / effective_dimension(second_order)


def saddlepoint_allowance(result: GroundTruth) -> float:
    """-log(|u| R(|u|)) for the saddlepoint's u (the formula's error for a Gaussian C), via scipy."""
    u = abs(result.details["saddlepoint"]) * math.sqrt(result.details["cgf_second"])
    mills = math.exp(float(scipy.stats.norm.logsf(u) - scipy.stats.norm.logpdf(u)))
    return -math.log(u * mills)


def _random_quadratic(dim: int, seed: int, zeros: int = 0):
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.2, 3.0, dim)
    lam[:zeros] = 0.0
    return lam, rng.normal(0.0, 0.6, dim)


def _monte_carlo_log_probability(cost, sample, n: int, seed: int):
    """log of the fraction of n prior samples with cost <= 0 (cost folds eps in), and its standard error."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n // 100_000):
        hits += int((cost(sample(rng, 100_000)) <= 0).sum())
    p = hits / n
    return math.log(p), math.sqrt((1 - p) / (p * n))


def _quadratic_mc(lam, y0, eps, sigma, n=400_000, seed=1):
    cost = lambda y: 0.5 * (lam * (y - y0) ** 2).sum(axis=1) - eps
    return _monte_carlo_log_probability(cost, lambda rng, k: rng.normal(0.0, sigma, (k, lam.size)), n, seed)


@pytest.mark.parametrize("dim, fraction", [(3, 0.4), (5, 0.25), (8, 0.2), (10, 0.15)])
def test_saddlepoint_formulas_match_monte_carlo(dim, fraction):
    lam, y0 = _random_quadratic(dim, seed=dim, zeros=int(dim >= 5))
    sigma = 1.1
    mean = 0.5 * float((lam * (sigma**2 + y0**2)).sum())
    eps = fraction * mean
    mc, se = _quadratic_mc(lam, y0, eps, sigma)
    lr = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma, method="lugannani-rice")
    sp = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma, method="saddlepoint")
    second = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma, method="second-order")
    allowance = lugannani_rice_allowance(second)
    assert abs(lr.log_volume - mc) <= 4 * se + allowance, (lr.log_volume, mc, se)
    assert abs(second.log_volume - mc) <= 4 * se + second_order_allowance(second)
    assert -4 * se - allowance <= sp.log_volume - mc <= 4 * se + allowance + saddlepoint_allowance(sp)
    assert sp.standard_error == 0.0 and lr.standard_error == 0.0


@pytest.mark.parametrize("dim", [2, 3, 10, 50])
@pytest.mark.parametrize("fraction", [0.5, 0.05, 1e-5])
def test_isotropic_against_noncentral_chi_square(dim, fraction):
    lam, sigma = np.full(dim, 2.5), 0.8
    y0 = np.linspace(-0.5, 0.7, dim)
    a, nc = 2.5 * sigma**2, float(((y0 / sigma) ** 2).sum())  # 2C = a * noncentral chi-square(D, nc)
    eps = fraction * 0.5 * a * (dim + nc)
    exact = float(scipy.stats.ncx2.logcdf(2 * eps / a, dim, nc))
    lr = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma, method="lugannani-rice")
    sp = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma)
    second = quadratic_log_volume(lam, y0, cutoff=eps, sigma=sigma, method="second-order")
    allowance = lugannani_rice_allowance(second)
    assert abs(lr.log_volume - exact) <= allowance
    assert abs(second.log_volume - exact) <= second_order_allowance(second)
    assert -allowance <= sp.log_volume - exact <= allowance + saddlepoint_allowance(sp)


def test_central_chi_square_tiny_probability():
    """P ~ e^-500 (scipy underflows below e^-745: the reference is mpmath's incomplete gamma)."""
    dim, eps = 400, 0.2
    exact = float(mpmath.log(mpmath.gammainc(dim / 2, 0, eps, regularized=True)))  # chi2_D CDF at 2 eps
    second = quadratic_log_volume(np.ones(dim), np.zeros(dim), cutoff=eps, sigma=1.0, method="second-order")
    assert exact < -500
    assert abs(second.log_volume - exact) < 1e-6


def test_large_dimension_runs_and_matches_the_isotropic_truth():
    dim, eps = 1_000_000, 1e3
    exact = float(mpmath.log(mpmath.gammainc(dim / 2, 0, eps, regularized=True)))
    second = quadratic_log_volume(np.ones(dim), np.zeros(dim), cutoff=eps, sigma=1.0, method="second-order")
    assert exact < -1e6
    assert abs(second.log_volume - exact) < 1e-6 * abs(exact)


@pytest.mark.parametrize("dim", [50, 400, 2000])
def test_tilted_sampling_agrees_with_the_second_order_formula(dim):
    lam, y0 = _random_quadratic(dim, seed=dim, zeros=dim // 5)
    lam = lam * np.logspace(0, -3, dim)  # a spread spectrum
    mean = 0.5 * float((lam * (1.0 + y0**2)).sum())
    eps = 0.3 * mean
    second = quadratic_log_volume(lam, y0, cutoff=eps, sigma=1.0, method="second-order")
    tilted = tilted_log_volume(lam, y0, cutoff=eps, sigma=1.0, n_samples=20_000, seed=3)
    assert second.log_volume < -3
    assert 0.3 < tilted.details["hit_rate"] < 0.7
    assert abs(tilted.log_volume - second.log_volume) <= 4 * tilted.standard_error + second_order_allowance(second)


def test_tilted_is_seeded_and_batch_size_bounded():
    lam, y0 = _random_quadratic(30, seed=0)
    kwargs = {"cutoff": 2.0, "sigma": 1.0, "n_samples": 3000}
    first = tilted_log_volume(lam, y0, seed=5, **kwargs)
    assert first == tilted_log_volume(lam, y0, seed=5, **kwargs)
    assert first.log_volume != tilted_log_volume(lam, y0, seed=6, **kwargs).log_volume
    small = tilted_log_volume(lam, y0, seed=5, batch_size=7, **kwargs)
    assert abs(small.log_volume - first.log_volume) <= 4 * math.hypot(small.standard_error, first.standard_error)


def test_tilted_above_the_mean_is_plain_monte_carlo():
    lam, y0 = _random_quadratic(4, seed=2)
    eps = 2.0 * 0.5 * float((lam * (1.0 + y0**2)).sum())
    tilted = tilted_log_volume(lam, y0, cutoff=eps, sigma=1.0, n_samples=200_000, seed=0)
    mc, se = _quadratic_mc(lam, y0, eps, 1.0, n=200_000)
    assert tilted.details["saddlepoint"] == 0.0
    assert abs(tilted.log_volume - mc) <= 4 * math.hypot(se, tilted.standard_error)


def test_all_zero_eigenvalues_tilted_gives_probability_one():
    result = tilted_log_volume(np.zeros(3), np.ones(3), cutoff=0.1, sigma=1.0, n_samples=10, seed=0)
    assert result.log_volume == 0.0


# ----------------------------------------------------------------------------------------------------
# Lebesgue


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 40])
def test_lebesgue_against_ellipsoid_volume(dim):
    lam = np.linspace(0.5, 4.0, dim)
    eps = 0.3
    semi_axes = np.sqrt(2 * eps / lam)  # (1/2) lam y^2 <= eps  <=>  |y| <= sqrt(2 eps / lam)
    ball = {1: 2.0, 2: math.pi}  # V_D = 2 pi / D * V_(D-2)
    for d in range(3, dim + 1):
        ball[d] = 2 * math.pi / d * ball[d - 2]
    expected = math.log(ball[dim]) + float(np.log(semi_axes).sum())
    assert lebesgue_log_volume(torch.tensor(lam), cutoff=eps).log_volume == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Separable costs


def test_separable_without_quartic_is_the_quadratic():
    lam, y0 = _random_quadratic(12, seed=4, zeros=3)
    for method in ("saddlepoint", "lugannani-rice", "second-order"):
        quadratic = quadratic_log_volume(lam, y0, cutoff=1.0, sigma=0.9, method=method)
        separable = separable_log_volume(lam, y0, cutoff=1.0, sigma=0.9, method=method)
        assert separable.log_volume == pytest.approx(quadratic.log_volume, abs=1e-9)
        assert separable.details["quadrature_error"] < 1e-9


def _quartic_cost(lam, y0, kappa, eps):
    def cost(y):
        u = y - y0
        return (0.5 * lam * u**2 + kappa * u**4).sum(axis=1) - eps

    return cost


@pytest.mark.parametrize("dim", [4, 8])
@pytest.mark.parametrize("prior", ["gaussian", "uniform"])
def test_separable_quartic_against_monte_carlo(dim, prior):
    lam, y0 = _random_quadratic(dim, seed=10 + dim, zeros=dim // 4)
    kappa, eps = 0.3, 0.25 * dim / 4
    if prior == "gaussian":
        options, sample = {"sigma": 1.2}, lambda rng, k: rng.normal(0.0, 1.2, (k, dim))
    else:
        options, sample = {"bounds": 2.0, "prior": "uniform"}, lambda rng, k: rng.uniform(-2.0, 2.0, (k, dim))
    mc, se = _monte_carlo_log_probability(_quartic_cost(lam, y0, kappa, eps), sample, 400_000, 7)
    tilted = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, method="tilted", n_samples=40_000, seed=1, **options)
    lr = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, method="lugannani-rice", **options)
    second = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, method="second-order", **options)
    assert abs(tilted.log_volume - mc) <= 4 * math.hypot(se, tilted.standard_error)
    assert abs(lr.log_volume - mc) <= 4 * se + lugannani_rice_allowance(second)
    assert abs(second.log_volume - mc) <= 4 * se + second_order_allowance(second)


def _box_probability_2d(lam, y0, kappa, eps, b):
    """P(g1(x1) + g2(x2) <= eps), x uniform on [-b, b]^2, by scipy quadrature of the x2-section's length."""

    def half_width(level, i):  # |u| with (1/2) lam u^2 + kappa u^4 = level
        return math.sqrt((-0.5 * lam[i] + math.sqrt(0.25 * lam[i] ** 2 + 4 * kappa * level)) / (2 * kappa))

    def section(x1):
        level = eps - (0.5 * lam[0] * (x1 - y0[0]) ** 2 + kappa * (x1 - y0[0]) ** 4)
        if level <= 0:
            return 0.0
        w = half_width(level, 1)
        return max(0.0, min(b, y0[1] + w) - max(-b, y0[1] - w))

    w1 = half_width(eps, 0)
    lo, hi = max(-b, y0[0] - w1), min(b, y0[0] + w1)
    kinks = []  # where the x2-section starts to be clipped by the box: quad is told about them
    for edge in (b - y0[1], -b - y0[1]):
        rest = eps - (0.5 * lam[1] * edge**2 + kappa * edge**4)
        if rest > 0:
            kinks += [x for x in (y0[0] - half_width(rest, 0), y0[0] + half_width(rest, 0)) if lo < x < hi]
    value, _ = scipy.integrate.quad(section, lo, hi, points=kinks or None, epsabs=0, epsrel=1e-11, limit=200)
    return value / (2 * b) ** 2


def test_uniform_box_one_dimension_exact():
    lam, y0, kappa, eps, b = np.array([2.0]), np.array([0.9]), 0.5, 0.3, 1.0
    u = math.sqrt((-0.5 * lam[0] + math.sqrt(0.25 * lam[0] ** 2 + 4 * kappa * eps)) / (2 * kappa))
    exact = math.log((min(b, y0[0] + u) - max(-b, y0[0] - u)) / (2 * b))  # the box clips the interval
    tilted = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, prior="uniform", bounds=b, method="tilted", n_samples=50_000, seed=0)
    lr = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, prior="uniform", bounds=b, method="lugannani-rice")
    assert abs(tilted.log_volume - exact) <= 4 * tilted.standard_error
    assert abs(lr.log_volume - exact) <= 0.1  # one dimension: the formula's worst case (0.05 measured)


def test_uniform_box_two_dimensions_against_quadrature():
    lam, y0, kappa, eps, b = np.array([3.0, 0.5]), np.array([0.4, -1.2]), 0.2, 0.2, 1.5
    exact = math.log(_box_probability_2d(lam, y0, kappa, eps, b))
    tilted = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, prior="uniform", bounds=b, method="tilted", n_samples=50_000, seed=0)
    lr = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, prior="uniform", bounds=b, method="lugannani-rice")
    second = separable_log_volume(lam, y0, cutoff=eps, quartic=kappa, prior="uniform", bounds=b, method="second-order")
    assert abs(tilted.log_volume - exact) <= 4 * tilted.standard_error
    assert abs(lr.log_volume - exact) <= 0.1
    assert abs(second.log_volume - exact) <= second_order_allowance(second)  # 0.008 of 0.064 measured


@pytest.mark.parametrize("prior", ["gaussian", "uniform"])
def test_cumulant_generating_function_against_mpmath(prior):
    lam, y0, kappa, t = np.array([2.0, 0.0]), np.array([0.7, -0.4]), np.array([0.1, 0.5]), -30.0
    options = {"sigma": 1.3} if prior == "gaussian" else {"bounds": np.array([1.0, 0.3]), "prior": "uniform"}
    problem = _problem(lam, y0, 0.1, kappa, prior, options.get("sigma"), options.get("bounds"), None)
    per_coordinate = separable_cgf(problem, t)[-1]
    mpmath.mp.dps = 30
    for i in range(2):

        def g(y, i=i):
            return 0.5 * lam[i] * (y - y0[i]) ** 2 + kappa[i] * (y - y0[i]) ** 4

        if prior == "gaussian":
            def density(y, i=i):
                return mpmath.npdf(y, 0, 1.3) * mpmath.exp(t * g(y, i))

            points = [-mpmath.inf, y0[i] - 1, y0[i], y0[i] + 1, mpmath.inf]
        else:
            b = options["bounds"][i]

            def density(y, i=i, b=b):
                return mpmath.exp(t * g(y, i)) / (2 * b)

            points = sorted({-b, float(np.clip(y0[i], -b, b)), b})
        assert per_coordinate[i] == pytest.approx(float(mpmath.log(mpmath.quad(density, points))), abs=1e-10)


# ----------------------------------------------------------------------------------------------------
# Errors


def test_ground_truth_is_frozen():
    result = lebesgue_log_volume([1.0], cutoff=1.0)
    assert isinstance(result, GroundTruth)
    with pytest.raises(AttributeError):
        result.log_volume = 0.0


@pytest.mark.parametrize(
    "eigenvalues, anchor, match",
    [
        ([1.0, -1e-3], [0.0, 0.0], "clamp"),
        ([1.0, 2.0], [0.0], "anchor_coords has 1"),
        ([1.0, math.nan], [0.0, 0.0], "finite"),
        ([1.0, 2.0], [0.0, math.inf], "finite"),
        ([[1.0, 2.0]], [0.0, 0.0], "1-D"),
        ([], [], "non-empty"),
    ],
)
def test_bad_vectors_are_refused(eigenvalues, anchor, match):
    with pytest.raises(ValueError, match=match):
        quadratic_log_volume(eigenvalues, anchor, cutoff=0.1, sigma=1.0)
    with pytest.raises(ValueError, match=match):
        separable_log_volume(eigenvalues, anchor, cutoff=0.1, sigma=1.0)


def test_cutoff_above_the_mean_is_refused_by_the_formulas():
    with pytest.raises(ValueError, match="at or above the mean.*tilted_log_volume"):
        quadratic_log_volume([1.0, 1.0], [0.0, 0.0], cutoff=1.0, sigma=1.0)  # E[C] = 1
    with pytest.raises(ValueError, match="at or above the prior mean.*method='tilted'"):
        separable_log_volume([1.0], [0.0], cutoff=5.0, quartic=0.1, sigma=1.0)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        quadratic_log_volume([1.0], [0.0], cutoff=0.1, sigma=1.0, method="exact")
    with pytest.raises(ValueError, match="sigma must be"):
        quadratic_log_volume([1.0], [0.0], cutoff=0.1, sigma=0.0)
    with pytest.raises(ValueError, match="cutoff must be finite and positive"):
        quadratic_log_volume([1.0], [0.0], cutoff=-1.0, sigma=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        tilted_log_volume([1.0], [0.0], cutoff=0.1, sigma=1.0, n_samples=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        tilted_log_volume([1.0], [0.0], cutoff=0.1, sigma=1.0, n_samples=10, seed=-1)
    with pytest.raises(ValueError, match="infinite"):
        lebesgue_log_volume([1.0, 0.0], cutoff=0.1)


def test_bad_separable_options_are_refused():
    base = {"cutoff": 0.1, "quartic": 0.1}
    with pytest.raises(ValueError, match="not rotation invariant"):
        rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
        separable_log_volume([1.0, 1.0], [0.0, 0.0], prior="uniform", bounds=1.0, eigenvectors=rotation, **base)
    with pytest.raises(ValueError, match="takes bounds"):
        separable_log_volume([1.0], [0.0], prior="uniform", **base)
    with pytest.raises(ValueError, match="takes sigma"):
        separable_log_volume([1.0], [0.0], prior="gaussian", bounds=1.0, **base)
    with pytest.raises(ValueError, match="prior must be one of"):
        separable_log_volume([1.0], [0.0], prior="laplace", sigma=1.0, **base)
    with pytest.raises(ValueError, match="quartic must be >= 0"):
        separable_log_volume([1.0], [0.0], cutoff=0.1, quartic=-1.0, sigma=1.0)
    with pytest.raises(ValueError, match="one value per eigenvalue"):
        separable_log_volume([1.0, 1.0], [0.0, 0.0], cutoff=0.1, quartic=[0.1, 0.2, 0.3], sigma=1.0)
    with pytest.raises(ValueError, match="bounds must be finite and positive"):
        separable_log_volume([1.0, 1.0], [0.0, 0.0], prior="uniform", bounds=[1.0, -1.0], **base)
    with pytest.raises(ValueError, match="n_samples"):
        separable_log_volume([1.0], [0.0], sigma=1.0, method="tilted", **base)
    # a diagonal H with its eigenvectors given (signs flipped) is accepted under the box prior
    flips = torch.diag(torch.tensor([1.0, -1.0]))
    separable_log_volume([1.0, 1.0], [0.0, 0.0], prior="uniform", bounds=1.0, eigenvectors=flips, **base)
