"""Exact log volumes (nats) of neighborhoods S = {theta : C(theta) <= eps}, to measure estimators against
(MATH.md, "Ground truth for quadratic neighborhoods").

Quadratic cost, Gaussian prior N(0, sigma^2 I). C(theta) = (1/2)(theta - theta0)^T H (theta - theta0) with
H = Q diag(lam) Q^T positive semi-definite. The prior is rotation invariant, so in y = Q^T theta the problem
is diagonal: with z ~ N(0, I), a_i = lam_i sigma^2 and d_i = -y0_i / sigma (y0 = Q^T theta0),

    mu(S) = P(X <= 2 eps),   X = sum_i a_i (z_i + d_i)^2,

a generalized (non-central) chi-square CDF, whose cumulant generating function is

    K(s) = sum_i [ -(1/2) log(1 - 2 s a_i) + a_i d_i^2 s / (1 - 2 s a_i) ],   s < 1 / (2 max a).

Zero eigenvalues are unconstrained directions: a_i = 0 adds nothing to X or K.

- ``quadratic_log_volume(..., method="saddlepoint")``: solve K'(s) = 2 eps (s < 0, the lower tail) by
  bisection in log(-s), then the density-to-tail saddlepoint formula
      log P ~ K(s) - 2 eps s - log(|s| sqrt(2 pi K''(s))).
  It is high by about -log(|u| R(|u|)) ~ 1/u^2 nats, u = s sqrt(K''(s)) and R the Mills ratio (its
  exact error when C is Gaussian): good when u^2 >> 1 (high D, small P), poor near the mean. Measured
  against scipy's ncx2 (isotropic, eps 1e-5..0.5 of the mean): +0.09..0.50 nats at D = 2,
  +0.06..0.42 at D = 3, +0.004..0.07 at D = 50. Kept because MATH.md states it.
- ``method="lugannani-rice"``: P ~ Phi(w) + phi(w) (1/w - 1/u), w = -sqrt(2 (2 eps s - K(s))),
  u = s sqrt(K''(s)), evaluated in logs (through the Mills ratio) so that P down to exp(-1e6) is fine.
  Measured error (isotropic against ncx2, eps 1e-5..0.5 of the mean; 24 random spectra in D = 2..10
  against 4e5 tilted samples): at most 0.16 / D_eff nats, D_eff = 8 / rho3^2 (rho3 the tilted law's
  skewness; D_eff = D for a central isotropic chi-square): 0.072 at D = 2 (its eps -> 0 limit is
  Stirling's error for Gamma(D/2 + 1)), 0.056 on a random spectrum in D = 4, 0.003 at D = 50.
- ``method="second-order"``: Lugannani-Rice plus Daniels' (1987) next-order term (the tilted law's
  standardized third and fourth cumulants rho3, rho4; ``lower_tail_log_probability``). Measured as
  above: at most 0.055 / D_eff nats: 0.0094 at D = 2 isotropic, 0.015 on random spectra, 4e-4 at D = 10,
  2e-5 at D = 50. The most accurate of the three in D >= 2 and the one to use as a reference (one
  dimension is its bad case: 0.20 nats on a 1-D box in core/separable.py, where Lugannani-Rice has 0.05).
  All three are deterministic approximations: their ``standard_error`` is 0.0 (no sampling noise; the
  approximation error above is not included).
- ``tilted_log_volume``: exact, unbiased importance sampling from the exponentially tilted law
  z_i ~ N(m_i, v_i), v_i = 1 / (1 - 2 s a_i), m_i = 2 s a_i d_i v_i, with weight exp(K(s) - s X):
      P = E_tilted[ exp(K(s) - s X) 1{X <= 2 eps} ],
  about half of the samples hit; its ``standard_error`` is the delta-method standard error of the log.
- ``lebesgue_log_volume``: Lebesgue measure of the ellipsoid, closed form
      log V = log V_D + (D/2) log(2 eps) - (1/2) sum_i log lam_i,   V_D = pi^(D/2) / Gamma(D/2 + 1).

Separable non-quadratic costs (a quartic term per eigen-coordinate) under the Gaussian or the uniform box
prior are in ``core/separable.py`` (``separable_log_volume``), which uses the same saddlepoint formulas.

Example (values as printed on this machine)::

    >>> lam = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)  # H's eigenvalues; the third is free
    >>> y0 = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)  # the anchor in H's eigenbasis
    >>> quadratic_log_volume(lam, y0, cutoff=0.05, sigma=1.0, method="lugannani-rice").log_volume
    -3.7253...
    >>> quadratic_log_volume(lam, y0, cutoff=0.05, sigma=1.0, method="second-order").log_volume
    -3.7680...
    >>> r = tilted_log_volume(lam, y0, cutoff=0.05, sigma=1.0, n_samples=100_000, seed=0)
    >>> r.log_volume, r.standard_error    # exact up to its noise (brute-force MC: -3.763 +- 0.005)
    (-3.7711..., 0.00266...)

All arithmetic is float64 numpy; inputs may be torch tensors, numpy arrays or lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from localvol_fast.core.checks import (
    check_choice,
    check_cutoff,
    check_integer,
    check_number,
    check_seed,
)

SADDLEPOINT_METHODS = ("saddlepoint", "lugannani-rice", "second-order")
# Elements of one (batch, D) block of tilted samples: about 32 MiB of float64 per temporary.
_BLOCK_ELEMENTS = 1 << 22
# Bisection in log(-s): log(-s) is bracketed within [-_LOG_S_LIMIT, _LOG_S_LIMIT] (beyond, s or 1/s
# overflows float64) and halved until the bracket is this narrow (relative precision of s).
_LOG_S_LIMIT = 700.0
_LOG_S_TOLERANCE = 1e-11  # log P is stationary in s at the saddlepoint: 1e-11 in s is ~1e-22 in log P
# Above this |w| the Mills ratio R(x) = (1 - Phi(x)) / phi(x) minus 1/x comes from its asymptotic series
# (the direct difference would cancel); below, from erfcx, losing at most log10(x^2) ~ 3 digits.
_MILLS_SERIES_FROM = 30.0


@dataclass(frozen=True)
class GroundTruth:
    """A reference log volume (nats) of S = {C <= eps} under the stated measure.

    standard_error: of ``log_volume`` from sampling (delta method) for the sampling methods; 0.0 for the
    deterministic approximations, whose approximation error it does not include.
    details: what was solved (saddlepoint s, K, K'', hit rate, quadrature error bound, ...).
    """

    log_volume: float
    standard_error: float
    method: str
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Checks


def as_float_vector(value, name: str) -> np.ndarray:
    """A non-empty 1-D vector of finite numbers as float64 numpy (a copy)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D tensor or array of numbers, got {type(value).__name__}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector (D,), got shape {tuple(array.shape)}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; element {first} is {array[first]!r}")
    return array


def check_eigenvalues(eigenvalues) -> np.ndarray:
    """H's eigenvalues (D,): finite and >= 0 (H is positive semi-definite)."""
    lam = as_float_vector(eigenvalues, "eigenvalues")
    if (lam < 0).any():
        first = int(np.flatnonzero(lam < 0)[0])
        raise ValueError(
            f"eigenvalues must be >= 0 (H positive semi-definite); element {first} is {lam[first]!r}. "
            "Rounding negatives from eigh of a PSD matrix can be clamped: eigenvalues.clamp(min=0)"
        )
    return lam


def check_anchor_coords(anchor_coords, dim: int) -> np.ndarray:
    """The anchor in H's eigenbasis, y0 = Q^T theta0 (D,)."""
    y0 = as_float_vector(anchor_coords, "anchor_coords")
    if y0.size != dim:
        raise ValueError(
            f"anchor_coords has {y0.size} values but eigenvalues has {dim}; pass y0 = Q^T theta0, one "
            "coordinate per eigenvalue (theta0 itself for a diagonal H)"
        )
    return y0


def check_sigma(sigma) -> float:
    return check_number(sigma, "sigma", minimum=1e-150, maximum=1e150, what="the Gaussian prior's standard deviation")


def _quadratic_inputs(eigenvalues, anchor_coords, cutoff, sigma):
    """(a, d, target, mean) of X = sum a (z + d)^2 <= target = 2 eps, dropping the free (a = 0) directions."""
    lam = check_eigenvalues(eigenvalues)
    y0 = check_anchor_coords(anchor_coords, lam.size)
    eps = check_cutoff(cutoff)
    sigma = check_sigma(sigma)
    keep = lam > 0
    a = lam[keep] * sigma**2
    d = -y0[keep] / sigma
    return a, d, 2.0 * eps, float(np.sum(a * (1.0 + d * d)))


# ----------------------------------------------------------------------------------------------------
# The generalized chi-square CGF and the saddlepoint formulas (shared with core/separable.py)


def chi_square_cgf(s: float, a: np.ndarray, d: np.ndarray) -> tuple[float, float, float, float, float]:
    """K(s) and its first four derivatives for X = sum a_i (z_i + d_i)^2, s <= 0 (a: (D,) > 0, d: (D,))."""
    inverse = 1.0 / (1.0 - 2.0 * s * a)  # <= 1 for s <= 0
    ad2 = a * d * d
    value = float(np.sum(-0.5 * np.log1p(-2.0 * s * a) + ad2 * s * inverse))
    first = float(np.sum(inverse * (a + ad2 * inverse)))
    second = float(np.sum((a * inverse) ** 2 * (2.0 + 4.0 * d * d * inverse)))
    third = float(np.sum((a * inverse) ** 3 * (8.0 + 24.0 * d * d * inverse)))
    fourth = float(np.sum((a * inverse) ** 4 * (48.0 + 192.0 * d * d * inverse)))
    return value, first, second, third, fourth


def chi_square_cgf_derivative(s: float, a: np.ndarray, d: np.ndarray) -> float:
    """K'(s) alone (what the bisection needs), s <= 0."""
    inverse = 1.0 / (1.0 - 2.0 * s * a)
    return float(np.dot(a, inverse * (1.0 + d * d * inverse)))


def solve_lower_saddlepoint(derivative, target: float, mean: float) -> float:
    """The s < 0 with derivative(s) = target, for a derivative K' increasing in s with K'(0) = mean > target.

    Bisection in log(-s) (s spans hundreds of orders of magnitude between problems): the bracket grows by
    factors e^2 until it holds the root, then halves to relative precision 1e-11 in s.
    """
    if not target < mean:
        raise ValueError(f"the target {target!r} must lie below the mean {mean!r} (the lower tail)")
    low = high = -math.log(mean) if mean > 0 else 0.0  # log(-s) of a first guess s = -1 / mean
    while derivative(-math.exp(high)) >= target:  # K'(s) -> 0 as s -> -inf
        high += 2.0
        if high > _LOG_S_LIMIT:
            raise ValueError(f"no saddlepoint: K'(s) stays >= {target!r} down to s = -e^{_LOG_S_LIMIT:g}")
    while derivative(-math.exp(low)) <= target:  # K'(s) -> mean as s -> 0-
        low -= 2.0
        if low < -_LOG_S_LIMIT:
            raise ValueError(f"no saddlepoint: the target {target!r} is too close to the mean {mean!r}")
    while high - low > _LOG_S_TOLERANCE:
        middle = 0.5 * (low + high)
        if derivative(-math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return -math.exp(0.5 * (low + high))


def _log_mills_bracket(x: float, added: float) -> float:
    """log(R(x) - 1/x + added) for x = |w| > 0, R(x) = (1 - Phi(x)) / phi(x) the Mills ratio."""
    if x >= _MILLS_SERIES_FROM:
        # R(x) - 1/x = sum_{k>=1} (-1)^k (2k-1)!! / x^(2k+1): terms decrease for k < x^2 / 2.
        term, total = 1.0 / x, 0.0
        for k in range(1, 12):
            term *= -(2 * k - 1) / (x * x)
            total += term
    else:
        mills = math.sqrt(math.pi / 2) * float(torch.special.erfcx(torch.tensor(x / math.sqrt(2), dtype=torch.float64)))
        total = mills - 1.0 / x
    bracket = total + added
    if not bracket > 0:
        raise ValueError(
            f"the Lugannani-Rice formula gives a non-positive probability here (w = {-x!r}); the cutoff is "
            "too close to the mean for it: use tilted_log_volume (exact sampling) instead"
        )
    return math.log(bracket)


def lower_tail_log_probability(
    method: str, s: float, target: float, value: float, second: float, third: float = 0.0, fourth: float = 0.0
) -> tuple[float, dict]:
    """log P(X <= target), nats, from the saddlepoint s < 0 and K(s) = value and K's 2nd-4th derivatives.

    "saddlepoint": K - s x - log(|s| sqrt(2 pi K'')); "lugannani-rice": Phi(w) + phi(w) (1/w - 1/u);
    "second-order": Lugannani-Rice plus Daniels' (1987) next-order term, written for the lower tail,
        phi(w) [-(1/u)(rho4/8 - 5 rho3^2/24) + rho3/(2 u^2) + 1/u^3 - 1/w^3],
    rho_k = K^(k)(s) / K''(s)^(k/2) the tilted law's standardized cumulants (third, fourth needed).
    """
    exponent = value - s * target  # K(s) - s x <= 0 at the lower-tail saddlepoint
    info = {"saddlepoint": s, "cgf": value, "cgf_second": second, "exponent": exponent}
    if method == "saddlepoint":
        return exponent - math.log(-s) - 0.5 * math.log(2 * math.pi * second), info
    # Lugannani-Rice: P = phi(w) [R(|w|) + 1/w - 1/u] for w < 0, with Phi(w) = phi(w) R(|w|).
    x = math.sqrt(max(-2.0 * exponent, 0.0))
    u = s * math.sqrt(second)
    info.update(w=-x, u=u)
    if x == 0.0:
        raise ValueError("the saddlepoint is at the mean (w = 0): Lugannani-Rice is undefined there; use tilted_log_volume")
    added = -1.0 / u
    if method == "second-order":
        rho3, rho4 = third / second**1.5, fourth / second**2
        added += -(rho4 / 8 - 5 * rho3 * rho3 / 24) / u + rho3 / (2 * u * u) + 1 / u**3 + 1 / x**3  # -1/w^3 = 1/x^3
        info.update(rho3=rho3, rho4=rho4)
    log_phi = -0.5 * x * x - 0.5 * math.log(2 * math.pi)
    return log_phi + _log_mills_bracket(x, added), info


def _below_mean_error(target: float, mean: float, what: str) -> ValueError:
    return ValueError(
        f"cutoff eps = {target / 2:g} is at or above the mean of C under the prior ({mean / 2:g}): the "
        f"saddlepoint formulas here are for the lower tail (P < 1/2), and {what}. The probability is then "
        "at least about 1/2 (log volume within ~0.7 nats of 0): use tilted_log_volume, which samples the "
        "prior itself there (plain Monte Carlo, exact)"
    )


# ----------------------------------------------------------------------------------------------------
# Public functions


def quadratic_log_volume(eigenvalues, anchor_coords, *, cutoff, sigma, method: str = "saddlepoint") -> GroundTruth:
    """log P(C(theta) <= eps), theta ~ N(0, sigma^2 I), C = (1/2)(theta - theta0)^T H (theta - theta0), nats.

    eigenvalues: (D,) H's eigenvalues lam >= 0 (zeros are unconstrained directions); anchor_coords: (D,)
    y0 = Q^T theta0 (theta0 itself for a diagonal H); cutoff: eps > 0, below the prior mean of C,
    E[C] = (1/2) sum lam_i (sigma^2 + y0_i^2); method: "saddlepoint", "lugannani-rice" or "second-order"
    (module docstring; "second-order" is the most accurate).
    Returns GroundTruth with standard_error 0.0 (deterministic; the approximation error is not included).
    Cost: ~100 bisection steps, each O(D) vectorized: D = 1e6 takes about a second.
    """
    check_choice(method, SADDLEPOINT_METHODS, "method")
    a, d, target, mean = _quadratic_inputs(eigenvalues, anchor_coords, cutoff, sigma)
    if not target < mean:
        raise _below_mean_error(target, mean, "this eps is not in it")
    s = solve_lower_saddlepoint(lambda t: chi_square_cgf_derivative(t, a, d), target, mean)
    value, _, second, third, fourth = chi_square_cgf(s, a, d)
    log_p, info = lower_tail_log_probability(method, s, target, value, second, third, fourth)
    info.update(constrained_dims=int(a.size), mean_cost=mean / 2)
    return GroundTruth(log_p, 0.0, method, info)


def _tilted_blocks(a, d, s, target, n_samples, seed, batch_size):
    """Sum of r and r^2 over the samples, r = exp(s (target - X)) 1{X <= target} in [0, 1], and the hits."""
    v = 1.0 / (1.0 - 2.0 * s * a)
    m = 2.0 * s * a * d * v
    ta, tm, tsd = (torch.from_numpy(x) for x in (a, m + d, np.sqrt(v)))  # z + d = (m + d) + sqrt(v) xi
    generator = torch.Generator().manual_seed(seed)
    total = total_sq = 0.0
    hits = 0
    for start in range(0, n_samples, batch_size):
        rows = min(batch_size, n_samples - start)
        x = torch.zeros(rows, dtype=torch.float64)
        for lo in range(0, ta.numel(), max(1, _BLOCK_ELEMENTS // rows)):  # columns in pieces: bounded memory
            hi = lo + max(1, _BLOCK_ELEMENTS // rows)
            shifted = torch.randn(rows, ta[lo:hi].numel(), dtype=torch.float64, generator=generator)
            shifted.mul_(tsd[lo:hi]).add_(tm[lo:hi])
            x += shifted.square_().mul_(ta[lo:hi]).sum(dim=1)
        inside = x <= target
        r = torch.where(inside, torch.exp(s * (target - x)), torch.zeros_like(x))
        total += float(r.sum())
        total_sq += float(r.square().sum())
        hits += int(inside.sum())
    return total, total_sq, hits


def tilted_log_volume(
    eigenvalues, anchor_coords, *, cutoff, sigma, n_samples: int, seed: int, batch_size: int | None = None
) -> GroundTruth:
    """log P(C <= eps) (as ``quadratic_log_volume``) by exponentially tilted importance sampling, nats.

    Samples z_i ~ N(m_i, v_i) at the saddlepoint s (module docstring) and averages the exact weight
    exp(K(s) - s X) 1{X <= 2 eps}: unbiased in P (the log has a bias of about -SE^2/2). For eps at or above
    the prior mean, s = 0: plain Monte Carlo from the prior. Seeded (torch's CPU generator); memory bounded:
    batch_size samples at a time (default ~4e6 / D), their D columns in blocks of ~4e6 elements.
    Returns GroundTruth(log P, standard error of log P (delta method), "tilted", details with the hit rate).
    """
    a, d, target, mean = _quadratic_inputs(eigenvalues, anchor_coords, cutoff, sigma)
    n_samples = check_integer(n_samples, "n_samples", what="number of tilted samples")
    seed = check_seed(seed)
    dim = max(int(a.size), 1)
    batch_size = max(1, _BLOCK_ELEMENTS // dim) if batch_size is None else check_integer(batch_size, "batch_size")
    if target < mean:
        s = solve_lower_saddlepoint(lambda t: chi_square_cgf_derivative(t, a, d), target, mean)
        value = chi_square_cgf(s, a, d)[0]
    else:
        s = value = 0.0
    total, total_sq, hits = _tilted_blocks(a, d, s, target, n_samples, seed, batch_size)
    info = {"saddlepoint": s, "cgf": value, "hits": hits, "hit_rate": hits / n_samples, "n_samples": n_samples}
    if hits == 0:
        return GroundTruth(-math.inf, math.inf, "tilted", info)
    mean_r = total / n_samples
    variance = max(total_sq / n_samples - mean_r * mean_r, 0.0) * n_samples / max(n_samples - 1, 1)
    log_p = value - s * target + math.log(mean_r)
    return GroundTruth(log_p, math.sqrt(variance / n_samples) / mean_r, "tilted", info)


def lebesgue_log_volume(eigenvalues, *, cutoff) -> GroundTruth:
    """log of the Lebesgue volume of {(1/2)(theta - theta0)^T H (theta - theta0) <= eps}, nats (closed form).

    log V = log V_D + (D/2) log(2 eps) - (1/2) sum_i log lam_i, V_D = pi^(D/2) / Gamma(D/2 + 1) the unit
    ball's volume. eigenvalues: (D,), every one > 0 (a zero eigenvalue makes the volume infinite).
    """
    lam = check_eigenvalues(eigenvalues)
    eps = check_cutoff(cutoff)
    if (lam == 0).any():
        first = int(np.flatnonzero(lam == 0)[0])
        raise ValueError(
            f"eigenvalue {first} is 0: the neighborhood is unbounded along it and its Lebesgue volume is "
            "infinite; use a prior (quadratic_log_volume) or drop the flat directions"
        )
    dim = lam.size
    log_ball = 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)
    log_v = log_ball + 0.5 * dim * math.log(2.0 * eps) - 0.5 * float(np.sum(np.log(lam)))
    return GroundTruth(log_v, 0.0, "closed-form", {"log_unit_ball": log_ball})
