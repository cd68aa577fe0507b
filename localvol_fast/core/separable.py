"""Exact log volumes (nats) of separable non-quadratic neighborhoods (MATH.md, "Ground truth for quadratic
neighborhoods", the non-quadratic item).

In H's eigenbasis y = Q^T theta the cost is a sum of independent one-dimensional terms

    C(y) = sum_i g_i(y_i),   g_i(y) = (1/2) lam_i (y - y0_i)^2 + kappa_i (y - y0_i)^4,

and S = {C <= eps}. Under a product prior (the Gaussian N(0, sigma^2 I), which is rotation invariant, so
any H works; or the uniform box |theta_i| <= b_i, which is not, so H must be diagonal and y = theta) the
cumulant generating function of C is a sum of 1-D integrals,

    K(t) = sum_i K_i(t),   K_i(t) = log integral prior_i(y) exp(t g_i(y)) dy,   t <= 0,

with K'(t) = sum_i E_t[g_i] and K''(t) = sum_i Var_t[g_i] under the tilted laws
p_{i,t}(y) ~ prior_i(y) exp(t g_i(y)). These come from Gauss-Legendre quadrature on an interval around
each tilted mode; then the saddlepoint K'(t) = eps and the formulas of ``core/ground_truth.py``
(saddlepoint, Lugannani-Rice, second-order; K''' and K'''' are the tilted third and fourth cumulants of
the g_i, from the same quadrature) give log P, and tilted importance sampling checks it.

Quadrature error, and how it is bounded. f_i = -log(prior_i exp(t g_i)) is convex (t <= 0, lam, kappa >= 0),
so with m its minimizer and [y-, y+] the points where f_i rises by DELTA = 40 above f_i(m) (or the box's
edge), convexity bounds the mass outside: beyond y+ the integrand is below the line through (m, f(m)) and
(y+, f(m) + DELTA), and inside it is above the chord, so each side's missing mass is at most
e^-DELTA / (1 - e^-DELTA) of the kept mass: K_i is low by at most 2 e^-40 (8.5e-18 nats) per coordinate
(``details["truncation_bound"]``, summed over coordinates). On [y-, y+] the integrand is analytic and
Gauss-Legendre converges geometrically; its error is estimated by repeating with half the nodes
(``details["quadrature_error"]``: sum_i |K_i(n) - K_i(n/2)|, an over-estimate of the error with n nodes).

Tilted sampling, exact in P. Each coordinate is drawn by inverse CDF from a proposal q_i that is
log-linear between the points of a uniform grid on [y-, y+] (so it is close to p_{i,t}, and normalized
exactly), and weighted by prior(y) / q(y) * 1{C(y) <= eps}: unbiased for P whatever the grid, apart from
the prior mass of S outside the grids, bounded as above. It does not use the quadrature's K, so it is an
independent check of it.

Costs: the saddlepoint takes ~40 bisection steps, each a quadrature over all coordinates in blocks
(D = 4,810 with quartics: 5-15 s); tilted sampling keeps two (D, 513) float64 tables (8 KB a coordinate)
and draws D uniforms twice per sample (D = 4,810, 2e4 samples: about a minute on one core).

Example (values as printed on this machine)::

    >>> lam = torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    >>> y0 = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64)
    >>> separable_log_volume(lam, y0, cutoff=0.1, quartic=0.1, sigma=1.0, method="lugannani-rice").log_volume
    -4.6086...
    >>> box = dict(cutoff=0.1, quartic=0.1, prior="uniform", bounds=2.0)
    >>> separable_log_volume(lam, y0, **box, method="lugannani-rice").log_volume
    -5.7732...
    >>> r = separable_log_volume(lam, y0, **box, method="tilted", n_samples=100_000, seed=0)
    >>> r.log_volume, r.standard_error
    (-5.8074..., 0.00299...)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from localvol_fast.core.checks import (
    check_choice,
    check_cutoff,
    check_integer,
    check_positive_vector,
    check_seed,
)
from localvol_fast.core.ground_truth import (
    GroundTruth,
    as_float_vector,
    check_anchor_coords,
    check_eigenvalues,
    check_sigma,
    lower_tail_log_probability,
    solve_lower_saddlepoint,
)

SEPARABLE_METHODS = ("saddlepoint", "lugannani-rice", "second-order", "tilted")
PRIORS = ("gaussian", "uniform")
EDGE_RISE = 40.0  # DELTA: the quadrature interval ends where -log of the integrand rises this much
QUADRATURE_NODES = 128
SAMPLING_GRID = 512  # grid intervals of each coordinate's tilted proposal
_BLOCK_ELEMENTS = 1 << 21  # (coordinates x samples) per sampling block
_BISECTION_STEPS = 80


@dataclass(frozen=True)
class _Problem:
    """The constrained coordinates (g_i not identically 0), float64 (n,) each; the box's half-widths or None."""

    lam: np.ndarray
    y0: np.ndarray
    kappa: np.ndarray
    eps: float
    sigma: float | None
    bounds: np.ndarray | None

    def rows(self, part: slice) -> _Problem:
        """The same problem restricted to the coordinates ``part``."""
        box = None if self.bounds is None else self.bounds[part]
        return _Problem(self.lam[part], self.y0[part], self.kappa[part], self.eps, self.sigma, box)

    def cost_terms(self, y):
        """g_i(y) for y (n, k)."""
        u = y - self.y0[:, None]
        u2 = u * u
        return u2 * (0.5 * self.lam[:, None] + self.kappa[:, None] * u2)

    def log_prior(self, y):
        """log prior_i(y) for y (n, k) inside the support."""
        if self.bounds is None:
            return -0.5 * (y / self.sigma) ** 2 - 0.5 * math.log(2 * math.pi * self.sigma**2)
        return np.broadcast_to(-np.log(2 * self.bounds)[:, None], y.shape)

    def potential(self, t: float, y):
        """f_i(y) = -log prior_i(y) - t g_i(y), convex for t <= 0."""
        return -self.log_prior(y) - t * self.cost_terms(y)

    def mean_cost(self) -> float:
        """E[C] under the prior, closed form (moments of y - y0)."""
        if self.bounds is None:
            s2, m2 = self.sigma**2, self.y0**2
            second, fourth = s2 + m2, 3 * s2 * s2 + 6 * s2 * m2 + m2 * m2
        else:
            b, c = self.bounds, self.y0
            second = b * b / 3 + c * c
            fourth = ((b - c) ** 5 + (b + c) ** 5) / (10 * b)
        return float(np.sum(0.5 * self.lam * second + self.kappa * fourth))


def _check_box_basis(eigenvectors, dim: int) -> None:
    """The box prior is not rotation invariant: H must be diagonal (eigenvectors None or +-identity)."""
    if eigenvectors is None:
        return
    q = eigenvectors.detach().cpu().double().numpy() if isinstance(eigenvectors, torch.Tensor) else np.asarray(eigenvectors, dtype=np.float64)
    if q.shape != (dim, dim):
        raise ValueError(f"eigenvectors must be (D, D) = ({dim}, {dim}), got shape {tuple(q.shape)}")
    if not np.allclose(np.abs(q), np.eye(dim), rtol=0.0, atol=1e-12):
        raise ValueError(
            "the uniform box prior is not rotation invariant, so separable_log_volume needs a diagonal H "
            "(eigenvectors = identity, y = theta); this H is rotated. Use prior='gaussian' (rotation "
            "invariant) or a diagonal curvature"
        )


def _check_quartic(quartic, dim: int) -> np.ndarray:
    """kappa: a number or (D,), finite and >= 0, as (D,) float64."""
    if isinstance(quartic, (int, float, np.floating)) and not isinstance(quartic, bool):
        kappa = np.full(dim, float(quartic))
        if not np.isfinite(kappa).all():
            raise ValueError(f"quartic must be finite, got {quartic!r}")
    else:
        kappa = as_float_vector(quartic, "quartic")
        if kappa.size == 1:
            kappa = np.full(dim, kappa[0])
        elif kappa.size != dim:
            raise ValueError(f"quartic must be a number or one value per eigenvalue ({dim}), got {kappa.size} values")
    if (kappa < 0).any():
        first = int(np.flatnonzero(kappa < 0)[0])
        raise ValueError(f"quartic must be >= 0 (the kappa_i); element {first} is {kappa[first]!r}")
    return kappa


def _problem(eigenvalues, anchor_coords, cutoff, quartic, prior, sigma, bounds, eigenvectors) -> _Problem:
    lam = check_eigenvalues(eigenvalues)
    y0 = check_anchor_coords(anchor_coords, lam.size)
    eps = check_cutoff(cutoff)
    kappa = _check_quartic(quartic, lam.size)
    check_choice(prior, PRIORS, "prior")
    if prior == "gaussian":
        if bounds is not None or sigma is None:
            raise ValueError("prior='gaussian' takes sigma (its standard deviation) and no bounds")
        sigma, box = check_sigma(sigma), None
    else:
        if sigma is not None or bounds is None:
            raise ValueError("prior='uniform' takes bounds (the box |theta_i| <= b_i) and no sigma")
        _check_box_basis(eigenvectors, lam.size)
        scalar, vector = check_positive_vector(bounds, lam.size, "bounds", limits=(1e-150, 1e150))
        box = np.full(lam.size, scalar) if vector is None else vector.numpy()
    keep = (lam > 0) | (kappa > 0)  # the other directions are unconstrained and integrate to 1
    return _Problem(lam[keep], y0[keep], np.array(kappa[keep]), eps, sigma, None if box is None else box[keep])


def _mode(p: _Problem, t: float) -> np.ndarray:
    """argmin of f_i on the support, by bisection on f_i' (increasing)."""
    if p.bounds is not None:
        return np.clip(p.y0, -p.bounds, p.bounds)  # the box prior is flat: min of -t g
    low, high = np.minimum(0.0, p.y0), np.maximum(0.0, p.y0)  # f' <= 0 at the lower end, >= 0 at the upper
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        u = mid - p.y0
        slope = mid / p.sigma**2 - t * u * (p.lam + 4 * p.kappa * u * u)
        low, high = np.where(slope < 0, mid, low), np.where(slope < 0, high, mid)
    return 0.5 * (low + high)


def _edge(p: _Problem, t: float, mode: np.ndarray, sign: float) -> np.ndarray:
    """The point on the side ``sign`` of the mode where f rises by EDGE_RISE, or the box's edge first."""
    f0 = p.potential(t, mode[:, None])[:, 0]
    limit = np.full(mode.shape, np.inf) if p.bounds is None else p.bounds - sign * mode
    rise = lambda h: p.potential(t, (mode + sign * h)[:, None])[:, 0] - f0
    scale = p.sigma if p.bounds is None else p.bounds
    h = np.minimum(np.full(mode.shape, scale / (1.0 + math.sqrt(abs(t)))), limit)
    for _ in range(2000):  # doubling: f grows at least quadratically (Gaussian) or reaches the box edge
        grow = (rise(h) < EDGE_RISE) & (h < limit)
        if not grow.any():
            break
        h = np.where(grow, np.minimum(2 * h, limit), h)
    inside = rise(h) >= EDGE_RISE  # else the edge is the box's
    low, high = np.zeros_like(h), h.copy()
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        below = rise(mid) < EDGE_RISE
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return mode + sign * np.where(inside, high, h)


def _intervals(p: _Problem, t: float):
    mode = _mode(p, t)
    return mode, _edge(p, t, mode, -1.0), _edge(p, t, mode, 1.0)


@functools.lru_cache(maxsize=4)
def _gauss_legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)


def _quadrature(p: _Problem, t: float, lower, upper, mode, nodes: int):
    """Per coordinate (n,): K_i(t) and the tilted law's cumulants of g_i (mean, variance, third, fourth:
    K_i's derivatives) by n-node Gauss-Legendre on [lower, upper]."""
    x, w = _gauss_legendre(nodes)
    centre, half = 0.5 * (upper + lower), 0.5 * (upper - lower)
    y = centre[:, None] + half[:, None] * x[None, :]
    f0 = p.potential(t, mode[:, None])
    density = w[None, :] * np.exp(-(p.potential(t, y) - f0))  # <= 1: f >= f(mode)
    mass = density.sum(axis=1)
    g = p.cost_terms(y)
    mean = (density * g).sum(axis=1) / mass
    centred = g - mean[:, None]
    variance, third, fourth = ((density * centred**k).sum(axis=1) / mass for k in (2, 3, 4))
    return -f0[:, 0] + np.log(half * mass), mean, variance, third, fourth - 3 * variance**2


def separable_cgf(p: _Problem, t: float, nodes: int = QUADRATURE_NODES):
    """K(t) and its first four derivatives (sums over coordinates) and the per-coordinate K_i (n,)."""
    step = max(1, _BLOCK_ELEMENTS // nodes)  # coordinates per block: bounded temporaries at any D
    parts = []
    for lo in range(0, p.lam.size, step):
        sub = p.rows(slice(lo, lo + step))
        mode, lower, upper = _intervals(sub, t)
        parts.append(_quadrature(sub, t, lower, upper, mode, nodes))
    columns = [np.concatenate(x) for x in zip(*parts)]
    return (*(float(c.sum()) for c in columns), columns[0])


class _LogMoments:
    """Running log sum of w and of w^2 over samples given as log w (streams: no overflow, no storage)."""

    def __init__(self):
        self.log_sum = self.log_sum_sq = -math.inf

    def add(self, log_w: torch.Tensor) -> None:
        if log_w.numel():
            self.log_sum = float(torch.logaddexp(torch.tensor(self.log_sum), torch.logsumexp(log_w, 0)))
            self.log_sum_sq = float(torch.logaddexp(torch.tensor(self.log_sum_sq), torch.logsumexp(2 * log_w, 0)))

    def log_mean_and_error(self, n: int) -> tuple[float, float]:
        """log of the mean of w, and the delta-method standard error of that log."""
        if self.log_sum == -math.inf:
            return -math.inf, math.inf
        relative = max(math.exp(self.log_sum_sq - 2 * self.log_sum) - 1.0 / n, 0.0) * n / max(n - 1, 1)
        return self.log_sum - math.log(n), math.sqrt(relative)


def _proposal(p: _Problem, t: float):
    """Each coordinate's log-linear proposal on SAMPLING_GRID intervals of [y-, y+] (torch float64):
    lower (n,), width h (n,), log density at the grid points minus f(mode) (n, G+1), CDF at them (n, G+1),
    and log of the normalizer (n,)."""
    mode, lower, upper = _intervals(p, t)
    h = (upper - lower) / SAMPLING_GRID
    grid = lower[:, None] + h[:, None] * np.arange(SAMPLING_GRID + 1)[None, :]
    level = -(p.potential(t, grid) - p.potential(t, mode[:, None]))  # log p up to a constant, <= ~0
    step = np.diff(level, axis=1)
    ratio = np.where(np.abs(step) > 1e-12, np.expm1(step) / np.where(step == 0, 1.0, step), 1.0 + 0.5 * step)
    mass = h[:, None] * np.exp(level[:, :-1]) * ratio  # exact integral of the log-linear density per interval
    total = mass.sum(axis=1)
    cdf = np.concatenate([np.zeros((mass.shape[0], 1)), np.cumsum(mass, axis=1) / total[:, None]], axis=1)
    as_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    return as_torch(lower), as_torch(h), as_torch(level), as_torch(cdf), as_torch(np.log(total))


def _draw(p: _Problem, proposal, rows: slice, count: int, generator):
    """count samples of coordinates ``rows``: their log(prior / q) and their cost, each (count,) summed."""
    lower, h, level, cdf, log_total = (x[rows] for x in proposal)
    u = torch.rand(lower.numel(), count, dtype=torch.float64, generator=generator)
    j = torch.searchsorted(cdf[:, 1:-1].contiguous(), u.contiguous(), right=True)  # interval index
    left = level.gather(1, j)
    step = level.gather(1, j + 1) - left
    v = torch.rand(lower.numel(), count, dtype=torch.float64, generator=generator)
    small = step.abs() < 1e-12
    safe = torch.where(small, torch.ones_like(step), step)
    fraction = torch.where(small, v, torch.log1p(v * torch.expm1(safe)) / safe)  # inverse CDF in the interval
    fraction = fraction.clamp(0.0, 1.0)
    y = (lower[:, None] + h[:, None] * (j + fraction)).numpy()
    sub = p.rows(rows)
    log_q = left + step * fraction - log_total[:, None] + 0.0
    log_ratio = torch.from_numpy(np.ascontiguousarray(sub.log_prior(y))) - log_q
    return log_ratio.sum(0), torch.from_numpy(sub.cost_terms(y)).sum(0)


def _tilted(p: _Problem, t: float, n_samples: int, seed: int) -> tuple[float, float, dict]:
    """log P by tilted importance sampling (module docstring), its standard error, and the hit count."""
    proposal = _proposal(p, t)
    n = p.lam.size
    block = max(1, min(n_samples, _BLOCK_ELEMENTS // max(n, 1)))
    columns = max(1, _BLOCK_ELEMENTS // block)
    generator = torch.Generator().manual_seed(seed)
    moments, hits = _LogMoments(), 0
    for start in range(0, n_samples, block):
        count = min(block, n_samples - start)
        log_w = torch.zeros(count, dtype=torch.float64)
        cost = torch.zeros(count, dtype=torch.float64)
        for lo in range(0, n, columns):
            part_w, part_c = _draw(p, proposal, slice(lo, lo + columns), count, generator)
            log_w += part_w
            cost += part_c
        inside = cost <= p.eps
        hits += int(inside.sum())
        moments.add(log_w[inside])
    log_p, error = moments.log_mean_and_error(n_samples)
    return log_p, error, {"hits": hits, "hit_rate": hits / n_samples, "n_samples": n_samples}


def separable_log_volume(
    eigenvalues, anchor_coords, *, cutoff, quartic=0.0, prior: str = "gaussian", sigma=None, bounds=None,
    method: str = "saddlepoint", n_samples: int | None = None, seed: int | None = None, eigenvectors=None,
) -> GroundTruth:
    """log P(C(y) <= eps), C = sum_i (1/2) lam_i (y_i - y0_i)^2 + kappa_i (y_i - y0_i)^4, in nats.

    eigenvalues: (D,) lam >= 0; anchor_coords: (D,) y0 = Q^T theta0; quartic: kappa >= 0, a number or (D,);
    prior: "gaussian" (y ~ N(0, sigma^2 I); pass sigma) or "uniform" (theta uniform on the box |theta_i| <= b_i,
    pass bounds, a number or (D,); H must be diagonal: pass eigenvectors (D, D) to have that checked);
    method: "saddlepoint" / "lugannani-rice" / "second-order" (deterministic, standard_error 0.0, eps below
    the prior mean of C; ``quadratic_log_volume`` says how accurate each is) or "tilted" (importance
    sampling, needs n_samples and seed; eps anywhere).
    details: the saddlepoint t, K(t), K''(t), quadrature_error (nats, sum_i |K_i(n) - K_i(n/2)|) and
    truncation_bound (nats) at t, as the module docstring says.
    """
    check_choice(method, SEPARABLE_METHODS, "method")
    p = _problem(eigenvalues, anchor_coords, cutoff, quartic, prior, sigma, bounds, eigenvectors)
    if method == "tilted":
        n_samples = check_integer(n_samples, "n_samples", what="number of tilted samples")
        seed = check_seed(seed)
    if p.lam.size == 0:
        return GroundTruth(0.0, 0.0, method, {"constrained_dims": 0})  # C is identically 0: P = 1
    mean = p.mean_cost()
    if mean <= p.eps and method != "tilted":
        raise ValueError(
            f"cutoff eps = {p.eps:g} is at or above the prior mean of C ({mean:g}): the saddlepoint formulas "
            "are for the lower tail (P < 1/2). Use method='tilted', which samples the prior itself there "
            "(plain Monte Carlo, exact; P is then at least about 1/2)"
        )
    t = solve_lower_saddlepoint(lambda s: separable_cgf(p, s)[1], p.eps, mean) if mean > p.eps else 0.0
    value, _, second, third, fourth, per_coordinate = separable_cgf(p, t)
    coarse = separable_cgf(p, t, QUADRATURE_NODES // 2)[-1]
    info = {
        "saddlepoint": t, "cgf": value, "cgf_second": second, "constrained_dims": int(p.lam.size), "mean_cost": mean,
        "quadrature_error": float(np.abs(per_coordinate - coarse).sum()),
        "truncation_bound": float(p.lam.size * 2 * math.exp(-EDGE_RISE) / (1 - math.exp(-EDGE_RISE))),
    }
    if method == "tilted":
        log_p, error, sampled = _tilted(p, t, n_samples, seed)
        info.update(sampled)
        return GroundTruth(log_p, error, method, info)
    log_p, formula = lower_tail_log_probability(method, t, p.eps, value, second, third, fourth)
    info.update(formula)
    return GroundTruth(log_p, 0.0, method, info)
