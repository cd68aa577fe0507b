"""Batched radius search: for every direction of a batch find r with C(theta0 + r w_hat) = eps.

All active directions are probed together, one probe each per round, through one call of
``evaluate(rows, radii) -> costs``. Each direction keeps a bracket [lo, hi] with C(lo) < eps < C(hi)
(lo = 0 at the anchor, where C = 0) and steps in log-log space, where C ~ t^2 near the anchor:

- no upper end yet: extrapolate up along the local log-log slope (2 until measured);
- no positive lower end yet: extrapolate down from the upper end the same way;
- both ends: Illinois-safeguarded secant on (log t, log C/eps); bisection in log t where an end's
  cost is 0 or non-finite.

A direction converges when |C - eps| <= rtol * eps; its radius is then moved along the local slope to
hit eps exactly (an error d in log r moves a uniform-measure estimate by D * d nats). NaN or inf costs
count as outside the neighborhood. Non-monotone costs are flagged; the crossing found is the first
one the bracket met. No exception is raised for any cost values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

CONVERGED = "converged"
UNBOUNDED = "unbounded"  # C < eps all the way to the measure's reach (radius = that reach)
NONFINITE = "nonfinite"  # the ray leaves through a boundary where C becomes NaN/inf
JUMP = "jump"  # C jumps over eps at a point (the bracket closed without |C - eps| <= rtol eps)
NOT_CONVERGED = "not_converged"  # the evaluation budget ran out; radius interpolated in the bracket
STATUS_NAMES = (CONVERGED, UNBOUNDED, NONFINITE, JUMP, NOT_CONVERGED)

_DEFAULT_SLOPE = 2.0  # C ~ (t^2 / 2) w^T F w near the anchor
_MAX_GROWTH = 1e6  # largest factor one extrapolation may move a probe
_ZERO_COST_GROWTH = 100.0  # factor applied when C is exactly 0 (no slope information)
_NONFINITE_SHRINK = 0.1  # factor applied from a NaN/inf cost with no finite lower end
_BRACKET_COLLAPSED = 1e-12  # log-width of a bracket that cannot shrink further


@dataclass
class SearchOutcome:
    """Per direction (B,): radius, cost at the last probe, status name, evaluations, non-monotone flag,
    and the local log-log slope of C at the radius (NaN where the search did not converge)."""

    radii: torch.Tensor
    deltas: torch.Tensor
    status: list[str]
    n_evals: torch.Tensor
    nonmonotone: torch.Tensor
    slopes: torch.Tensor


def _local_slope(t1, c1, t2, c2, default: float = _DEFAULT_SLOPE):
    """log-log slope between two probes, ``default`` where it is undefined or implausible."""
    with torch.no_grad():
        slope = torch.log(c1 / c2) / torch.log(t1 / t2)
    ok = torch.isfinite(slope) & (slope > 0.05)
    return torch.where(ok, slope.clamp(0.25, 16.0), torch.full_like(slope, default))


def search_radii(
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    cap: torch.Tensor,
    cutoff: float,
    *,
    rtol: float = 1e-2,
    max_evals: int = 64,
    slope_hint: float = _DEFAULT_SLOPE,
) -> SearchOutcome:
    """Find the radii of a batch of directions.

    evaluate(rows, radii): costs (k,) at theta0 + radii * w_hat[rows]; rows int64 (k,), radii float64 (k,).
    initial: (B,) first probe; cap: (B,) largest radius worth probing (inf allowed).
    slope_hint: the log-log slope of C assumed until a direction has measured its own (2 near the
    anchor; the estimator passes the typical slope its first directions found at the cutoff).
    """
    eps = float(cutoff)
    cap = cap.double().clone()
    n = cap.numel()
    probe = torch.minimum(initial.double().clone(), cap)
    probe = torch.where(probe > 0, probe, torch.minimum(torch.ones_like(cap), cap))
    zeros = torch.zeros(n, dtype=torch.float64)
    lo_t, lo_c = zeros.clone(), zeros.clone()  # the anchor: C(0) = 0
    hi_t = torch.full((n,), math.inf, dtype=torch.float64)
    hi_c = torch.full((n,), math.inf, dtype=torch.float64)  # inf: unknown or non-finite
    hi_known = torch.zeros(n, dtype=torch.bool)
    last_side = torch.zeros(n, dtype=torch.int8)  # Illinois: which end moved last (-1 lo, +1 hi)
    lo_weight, hi_weight = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    prev_t, prev_c = torch.full((n,), math.nan, dtype=torch.float64), torch.full((n,), math.nan, dtype=torch.float64)
    radii = torch.full((n,), math.nan, dtype=torch.float64)
    deltas = torch.full((n,), math.nan, dtype=torch.float64)
    status = torch.full((n,), -1, dtype=torch.int64)
    n_evals = torch.zeros(n, dtype=torch.int64)
    nonmonotone = torch.zeros(n, dtype=torch.bool)
    slopes = torch.full((n,), math.nan, dtype=torch.float64)

    active = torch.arange(n)
    while active.numel():
        t = probe[active]
        c = torch.as_tensor(evaluate(active, t)).detach().to("cpu", torch.float64).reshape(-1)
        if c.numel() != active.numel():
            raise ValueError(f"the cost function returned {c.numel()} values for {active.numel()} parameter vectors")
        n_evals[active] += 1
        finite = torch.isfinite(c)
        hit = finite & ((c - eps).abs() <= rtol * eps)
        below = finite & (c < eps) & ~hit
        above = ~finite | ((c > eps) & ~hit)
        nonmonotone[active] |= (below & (c < lo_c[active]) & (t > lo_t[active])) | (
            above & finite & (c > hi_c[active]) & (t < hi_t[active]) & torch.isfinite(hi_c[active])
        )

        # Converged: move the radius along the local slope onto eps.
        if bool(hit.any()):
            rows = active[hit]
            th, ch = t[hit], c[hit]
            lo_ok = lo_c[rows] > 0
            hi_ok = hi_known[rows] & torch.isfinite(hi_c[rows])
            use_lo = torch.where(ch > eps, lo_ok | ~hi_ok, ~hi_ok)  # prefer the end across eps
            t_end = torch.where(use_lo, lo_t[rows], hi_t[rows])
            c_end = torch.where(use_lo, lo_c[rows], hi_c[rows])
            slope = _local_slope(th, ch, t_end, c_end, slope_hint)
            radii[rows] = th * (eps / ch) ** (1.0 / slope)
            slopes[rows] = slope
            deltas[rows] = ch
            status[rows] = STATUS_NAMES.index(CONVERGED)

        # Update the brackets.
        rows_b, rows_a = active[below], active[above]
        prev_ok = below | (above & finite)
        rows_p = active[prev_ok]
        lo_t[rows_b], lo_c[rows_b] = t[below], c[below]
        hi_t[rows_a] = t[above]
        hi_c[rows_a] = torch.where(finite[above], c[above], torch.full_like(c[above], math.inf))
        hi_known[rows_a] = True
        # Illinois: an end kept twice in a row gets its residual halved so the secant keeps moving.
        lo_weight[rows_b] = 1.0
        hi_weight[rows_a] = 1.0
        hi_weight[rows_b] = torch.where(last_side[rows_b] == -1, hi_weight[rows_b] * 0.5, hi_weight[rows_b])
        lo_weight[rows_a] = torch.where(last_side[rows_a] == 1, lo_weight[rows_a] * 0.5, lo_weight[rows_a])
        last_side[rows_b], last_side[rows_a] = -1, 1

        # Rays that stayed inside all the way to the cap.
        at_cap = below & (t >= cap[active])
        if bool(at_cap.any()):
            rows = active[at_cap]
            radii[rows], deltas[rows] = cap[rows], c[at_cap]
            status[rows] = STATUS_NAMES.index(UNBOUNDED)

        still = ~hit & ~at_cap
        rows = active[still]
        if not rows.numel():
            break
        # Brackets that cannot shrink further: the cost jumps over eps (or to NaN/inf) right here.
        width = torch.log(hi_t[rows] / lo_t[rows])
        collapsed = hi_known[rows] & (lo_t[rows] > 0) & (width < _BRACKET_COLLAPSED)
        out_of_budget = (n_evals[rows] >= max_evals) & ~collapsed
        done = collapsed | out_of_budget
        if bool(done.any()):
            d = rows[done]
            nonfinite_end = ~torch.isfinite(hi_c[d])
            code_collapsed = torch.where(
                nonfinite_end, torch.full_like(d, STATUS_NAMES.index(NONFINITE)), torch.full_like(d, STATUS_NAMES.index(JUMP))
            )
            status[d] = torch.where(collapsed[done], code_collapsed, torch.full_like(d, STATUS_NAMES.index(NOT_CONVERGED)))
            radii[d] = _bracket_estimate(lo_t[d], lo_c[d], hi_t[d], hi_c[d], hi_known[d], eps)
            best_lo = (lo_t[d] > 0) & ((eps - lo_c[d]) <= (hi_c[d] - eps))
            deltas[d] = torch.where(best_lo | ~torch.isfinite(hi_c[d]), lo_c[d], hi_c[d])
        rows = rows[~done]

        probe[rows] = _next_probe(
            rows, lo_t, lo_c, hi_t, hi_c, hi_known, lo_weight, hi_weight, prev_t, prev_c, cap, eps, slope_hint
        )
        prev_t[rows_p], prev_c[rows_p] = t[prev_ok], c[prev_ok]
        active = rows

    names = [STATUS_NAMES[k] for k in status.tolist()]
    return SearchOutcome(radii, deltas, names, n_evals, nonmonotone, slopes)


def _bracket_estimate(lo_t, lo_c, hi_t, hi_c, hi_known, eps):
    """Best radius from a bracket that did not converge: log-log interpolation, else its geometric mean."""
    usable = hi_known & (lo_t > 0) & (lo_c > 0) & torch.isfinite(hi_c)
    x_lo, x_hi = torch.log(lo_t), torch.log(hi_t)
    frac = (math.log(eps) - torch.log(lo_c)) / (torch.log(hi_c) - torch.log(lo_c))
    interpolated = torch.exp(x_lo + frac.clamp(0, 1) * (x_hi - x_lo))
    geometric = torch.where(lo_t > 0, torch.sqrt(lo_t * hi_t), hi_t)
    result = torch.where(usable, interpolated, geometric)
    return torch.where(hi_known, result, lo_t)


def _next_probe(rows, lo_t, lo_c, hi_t, hi_c, hi_known, lo_weight, hi_weight, prev_t, prev_c, cap, eps, slope_hint):
    lt, lc, ht, hc, known = lo_t[rows], lo_c[rows], hi_t[rows], hi_c[rows], hi_known[rows]
    pt, pc = prev_t[rows], prev_c[rows]
    log_eps = math.log(eps)

    # Growing: no point outside yet. Slope from the last two inside points when both are informative.
    slope_up = _local_slope(lt, lc, pt, pc, slope_hint)
    grow = torch.where(lc > 0, (eps / lc) ** (1.0 / slope_up), torch.full_like(lc, _ZERO_COST_GROWTH))
    grown = torch.minimum(lt * grow.clamp(1.0 + 1e-9, _MAX_GROWTH), cap[rows])

    # Shrinking: outside at hi, nothing positive inside yet.
    slope_down = _local_slope(ht, hc, pt, pc, slope_hint)
    shrink = torch.where(torch.isfinite(hc), (eps / hc) ** (1.0 / slope_down), torch.full_like(hc, _NONFINITE_SHRINK))
    shrunk = ht * shrink.clamp(1.0 / _MAX_GROWTH, 1.0 - 1e-9)

    # Bracketed: Illinois secant in (log t, log C/eps), bisection in log t where an end gives no slope.
    x_lo, x_hi = torch.log(lt), torch.log(ht)
    y_lo = (torch.log(lc) - log_eps) * lo_weight[rows]
    y_hi = (torch.log(hc) - log_eps) * hi_weight[rows]
    secant = x_lo - y_lo * (x_hi - x_lo) / (y_hi - y_lo)
    width = x_hi - x_lo
    secant = torch.minimum(torch.maximum(secant, x_lo + 1e-3 * width), x_hi - 1e-3 * width)
    finite_ends = (lc > 0) & torch.isfinite(hc)
    x_new = torch.where(finite_ends & torch.isfinite(secant), secant, 0.5 * (x_lo + x_hi))
    bracketed = torch.exp(x_new)

    return torch.where(~known, grown, torch.where(lt > 0, bracketed, shrunk))
