"""The radial integral of the Gaussian measure, in log space (MATH.md, "Gaussian").

    log_radial_integral(n, a, b, r) = log  integral_0^r  t^n exp(-a t^2 / 2 + b t) dt

for a > 0, n >= 0 (real; n = D - 1 in the estimator, up to ~1e10), any real b and 0 < r <= inf. The inputs
broadcast like a torch op; the result is a float64 tensor of the broadcast shape, on the inputs' device.

Method. Substitute t = exp(x): the integral is  integral_{-inf}^{log r} exp(F(x)) dx  with

    F(x) = m x - a e^{2x} / 2 + b e^x,    m = n + 1   (the extra 1 is the Jacobian dt = t dx).

F'(x) = m - a t^2 + b t = a (t* - t)(t - t_-) has a single positive root
t* = (b + sqrt(b^2 + 4 a m)) / (2a), so F is unimodal and its maximum over x <= log r is at
t_m = min(r, t*): the interior peak when r >= t*, the endpoint r when r < t* (the usual case in the
estimator). Around x_m = log t_m write x = x_m + d; with A2 = a t_m^2 / 2 and A1 = b t_m,

    G(d) = F(x_m + d) - F(x_m) = m d - A2 expm1(2d) + A1 expm1(d)     (exact for any centre x_m).

The factorisation of F' gives G(d) <= -m (e^d - 1 - d) on both sides, so exp(G) < e^-50 beyond
d = -52 on the left and d = 5 on the right, whatever the inputs. Per element:

1. find the cuts d_lo < 0 < d_hi (d_hi <= log r - x_m) where G = -K (K = 50), by bisection on log|d|
   upwards from a small fraction of the local width 1 / (F'(x_m) + sqrt(2 A2 + m + |A1|)) to those
   bounds; only modest precision is needed since exp(G) is negligible at the cuts;
2. integrate exp(G) on [d_lo, 0] and [0, d_hi] with composite Gauss-Legendre (panels graded towards
   the peak: with small n the left side has a narrow peak and a long e^{m d} tail), in d itself, never
   forming x, so that widths of 1e-12 in x keep their precision;
3. log I = F(x_m) + log(sum) = m log t_m - A2 + A1 + log(sum).

Rounding in G costs ~10 eps sqrt(m + A2 + |A1|) in log I (~1e-10 only when that sum nears 1e12, where
|log I| is large); beyond that the accuracy is limited by the inputs themselves (log I moves by ~m eps
when a or r move by one ulp). Measured against mpmath
on 4,860 grid points (n 0..1e10, b / sqrt(a) in +-1e6, a 1e-8..1e12, r 1e-6..10 x peak and inf): max
relative error 2.4e-15 (tests/core/test_radial.py checks 1e-10).

Everything is elementwise with a fixed number of iterations (no loop over elements), in float64, and
large inputs are processed in chunks so that the (elements x nodes) work arrays stay bounded.
Results are never NaN: values beyond the float64 range come out as +-inf, and where |F(x_m)| > 1e290
(n beyond ~1e290) F(x_m) alone is returned, log(sum) being below its resolution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["log_ball_volume", "log_radial_integral", "log_sphere_area"]

# exp(G) below e^-K of its peak is dropped: the lost mass is < e^-K / |G'| < 1e-21 relative.
_CUT_DEPTH = 50.0
# G(d) <= -m (e^d - 1 - d) with m >= 1 puts the cut within these distances of the peak (see docstring).
_LEFT_LIMIT = _CUT_DEPTH + 2.0
_RIGHT_LIMIT = 5.0
# The bisection starts this many e-folds below the local width, where G is certainly above -K.
_BELOW_WIDTH = 8.0
_BISECTION_STEPS = 14
# Quadrature per side: panels x Gauss-Legendre nodes; breakpoints (k / P)^GRADING crowd the peak.
_PANELS = 6
_NODES = 16
_GRADING = 3.0
# Elements per chunk (each holds ~40 float64 vectors) and rows per quadrature block (CHUNK_ROWS x 2 x
# PANELS x NODES float64 work arrays, ~12 MB each). Big chunks keep the per-element vector ops few and
# large, which matters more than cache: small transcendental ops pay the thread wake-up each time.
_CHUNK = 1 << 18
_QUADRATURE_ROWS = 1 << 13


def _panel_rule(panels: int, nodes: int, grading: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in (0, 1) and weights (sum 1) of a composite Gauss-Legendre rule with graded panels."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = (np.arange(panels + 1) / panels) ** grading
    lo, width = edges[:-1, None], np.diff(edges)[:, None]
    return (lo + width * (x + 1) / 2).ravel(), (width * w / 2).ravel()


_RULE_NODES, _RULE_WEIGHTS = _panel_rule(_PANELS, _NODES, _GRADING)


def _as_float64(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64), device=device)


def _check(condition_bad: torch.Tensor, value: torch.Tensor, name: str, allowed: str) -> None:
    if bool(condition_bad.any()):
        flat_bad = condition_bad.reshape(-1)
        first = int(flat_bad.nonzero()[0])
        position = np.unravel_index(first, tuple(condition_bad.shape)) if condition_bad.dim() else ()
        got = float(value.expand_as(condition_bad).reshape(-1)[first])
        where = f" at index {tuple(int(i) for i in position)}" if position else ""
        raise ValueError(
            f"log_radial_integral: {name} must be {allowed}; got {name}={got!r}{where} "
            f"({int(flat_bad.sum())} bad value(s))"
        )


def log_radial_integral(n, a, b, r) -> torch.Tensor:
    """log of integral_0^r t^n exp(-a t^2 / 2 + b t) dt, elementwise over the broadcast inputs.

    n: exponent, finite and >= 0 (n = D - 1); a: finite and > 0; b: finite; r: radius in (0, inf].
    Accepts Python numbers, numpy arrays or tensors of any float dtype; returns float64 with the
    broadcast shape, on the device of the first tensor input. Raises ValueError for NaN, n < 0, a <= 0,
    r <= 0 or an infinite n, a or b.
    """
    device = next((v.device for v in (n, a, b, r) if isinstance(v, torch.Tensor)), torch.device("cpu"))
    n, a, b, r = torch.broadcast_tensors(*(_as_float64(v, device) for v in (n, a, b, r)))
    for value, name in ((n, "n"), (a, "a"), (b, "b"), (r, "r")):
        _check(torch.isnan(value), value, name, "a number, not NaN")
    _check(~torch.isfinite(n) | (n < 0), n, "n", "finite and >= 0")
    _check(~torch.isfinite(a) | (a <= 0), a, "a", "finite and > 0")
    _check(~torch.isfinite(b), b, "b", "finite")
    _check(r <= 0, r, "r", "> 0 (inf is allowed)")

    shape = n.shape
    flat = [t.reshape(-1) for t in (n, a, b, r)]
    out = torch.empty(shape.numel(), dtype=torch.float64, device=device)
    for start in range(0, out.numel(), _CHUNK):
        stop = min(start + _CHUNK, out.numel())
        out[start:stop] = _log_radial_chunk(*(t[start:stop] for t in flat))
    return out.reshape(shape)


def _log_radial_chunk(n: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    m = n + 1.0
    # Peak t* of exp(F): the positive root of a t^2 - b t - m. hypot avoids overflowing b^2 and 4 a m,
    # and for b < 0 the form t* = m / ((hyp - b)/2) avoids the cancellation in b + hyp.
    hyp_half = torch.hypot(b / 2.0, torch.sqrt(a) * torch.sqrt(m))  # sqrt(b^2 + 4 a m) / 2
    positive = b >= 0
    big_root_half = b.abs() / 2.0 + hyp_half  # = a t* (b >= 0) or m / t* (b < 0); inf only near 1e308
    log_big_root_half = torch.log(hyp_half) + torch.log1p(b.abs() / 2.0 / hyp_half)
    log_t_peak = torch.where(positive, log_big_root_half - torch.log(a), torch.log(m) - log_big_root_half)
    t_peak = torch.where(positive, big_root_half / a, m / big_root_half)
    t_peak = torch.where(torch.isinf(big_root_half), torch.exp(log_t_peak), t_peak)
    m_over_t_peak = torch.where(positive, m / t_peak, big_root_half)  # a |t_-|, t_- the negative root
    log_r = torch.log(r)
    interior = log_r >= log_t_peak  # the peak lies inside [0, r]
    t_m = torch.where(interior, t_peak, r)
    log_t_m = torch.where(interior, log_t_peak, log_r)

    quad_coef = a * t_m * t_m / 2.0  # A2
    lin_coef = b * t_m  # A1
    # |A1| <= m when b < 0 (see the roots), so A2 or A1 overflow only when log I > ~1e308: +inf then,
    # with finite stand-ins meanwhile.
    overflow = torch.isinf(quad_coef) | torch.isinf(lin_coef)
    quad_coef = torch.where(overflow, 0.0, quad_coef)
    lin_coef = torch.where(overflow, 0.0, lin_coef)

    def log_integrand(d: torch.Tensor) -> torch.Tensor:
        return _log_integrand(d, m[:, None], quad_coef[:, None], lin_coef[:, None])

    # Local width: 1 / (slope + sqrt(curvature)) at x_m. The slope F'(log r) = m - a r^2 + b r at an
    # endpoint is summed directly far below the peak (at most a factor 2 cancels there; t* may be inf)
    # and factored as a (t* - r)(r + |t_-|) near it; it is 0 at the peak.
    direct = m + r * (b - a * r)
    factored = (t_peak - r) * (a * r + m_over_t_peak)
    slope = torch.where(interior, 0.0, torch.where(r < t_peak / 2, direct, factored).clamp(0.0, 1e300))
    width = 1.0 / (slope + 2.0 * torch.sqrt(quad_coef / 2.0 + m / 4.0 + lin_coef.abs() / 4.0))
    log_start = torch.log(width) - _BELOW_WIDTH
    right_room = torch.where(interior, log_r - log_t_peak, 0.0)  # log r - x_m; inf for r = inf
    has_right = right_room > 0
    log_left_limit = torch.full_like(m, math.log(_LEFT_LIMIT))
    log_right_limit = torch.log(torch.where(has_right, right_room.clamp(max=_RIGHT_LIMIT), 1.0))

    d_left = _find_cut(log_integrand, -1.0, torch.minimum(log_start, log_left_limit), log_left_limit)
    d_right = _find_cut(log_integrand, 1.0, torch.minimum(log_start, log_right_limit), log_right_limit)
    d_right = torch.where(has_right, d_right, 0.0)

    nodes = torch.as_tensor(_RULE_NODES, dtype=torch.float64, device=m.device)
    weights = torch.as_tensor(_RULE_WEIGHTS, dtype=torch.float64, device=m.device)
    total = torch.empty_like(m)
    for start in range(0, m.numel(), _QUADRATURE_ROWS):
        rows = slice(start, start + _QUADRATURE_ROWS)
        left, right = d_left[rows, None], d_right[rows, None]
        offsets = torch.cat([left * -nodes, right * nodes], dim=1)
        integrand = _log_integrand(offsets, m[rows, None], quad_coef[rows, None], lin_coef[rows, None]).exp_()
        left_sum, right_sum = integrand[:, : nodes.numel()] @ weights, integrand[:, nodes.numel() :] @ weights
        total[rows] = left[:, 0] * left_sum + right[:, 0] * right_sum

    log_peak_value = m * log_t_m - quad_coef + lin_coef  # F(x_m); never NaN once A2, A1 are finite
    log_total = torch.log(total)  # within about [-800, 5]
    # Where |F(x_m)| > 1e290, log(total) is below its float64 resolution. This is also the only
    # place (n above ~1e300) where rounding can swamp G and spoil the sum; F(x_m) alone is then exact.
    usable = torch.isfinite(log_total) & (log_peak_value.abs() < 1e290)
    result = torch.where(usable, log_peak_value + log_total, log_peak_value)
    return torch.where(overflow, math.inf, result)


def _log_integrand(d: torch.Tensor, m: torch.Tensor, quad_coef: torch.Tensor, lin_coef: torch.Tensor) -> torch.Tensor:
    """G(d) = F(x_m + d) - F(x_m) = m d - A2 expm1(2d) + A1 expm1(d); d (rows, k), the others (rows, 1).

    Exact for any centre x_m; rounding costs ~eps (m + A2 + |A1|) |d|, small where exp(G) matters.
    """
    e1 = torch.expm1(d)
    g = d * m
    g.addcmul_(e1, lin_coef)
    e1.mul_(e1 + 2.0)  # expm1(2d)
    g.addcmul_(e1, quad_coef, value=-1.0)
    # m d and A2 expm1(2d) can both overflow (inf - inf) only for n > 1e303, far out in the right tail.
    return g.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _find_cut(log_integrand, sign: float, log_lo: torch.Tensor, log_hi: torch.Tensor) -> torch.Tensor:
    """Distance |d| <= exp(log_hi) where G(sign |d|) drops below -K (exp(log_hi) if it never does).

    Bisection on log|d| (G is monotone on each side of x_m); G(sign exp(log_lo)) > -K is assumed.
    Returns the outer end of the final bracket, so the cut is never inside the -K level.
    """
    lo, hi = log_lo, log_hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2.0
        inside = log_integrand(sign * torch.exp(mid)[:, None])[:, 0] > -_CUT_DEPTH
        lo = torch.where(inside, mid, lo)
        hi = torch.where(inside, hi, mid)
    return torch.exp(hi)


def log_sphere_area(D) -> float:
    """log of the area of the unit sphere S^{D-1} in R^D: log(2 pi^(D/2) / Gamma(D/2))."""
    D = float(D)
    if not D > 0:
        raise ValueError(f"log_sphere_area: D must be > 0; got D={D!r}")
    return math.log(2.0) + (D / 2.0) * math.log(math.pi) - math.lgamma(D / 2.0)


def log_ball_volume(D) -> float:
    """log of the volume of the unit ball in R^D: log(pi^(D/2) / Gamma(D/2 + 1))."""
    D = float(D)
    if not D > 0:
        raise ValueError(f"log_ball_volume: D must be > 0; got D={D!r}")
    return (D / 2.0) * math.log(math.pi) - math.lgamma(D / 2.0 + 1.0)
