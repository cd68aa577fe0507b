"""Batched radius search: for every direction of a batch find r with C(theta0 + r w_hat) = eps.

All active directions are probed together, one probe each per round, through one call of
``evaluate(rows, radii) -> costs``; bringing those costs to the host is the round's only wait for a
GPU (the next probes depend on them, and so does which directions remain). Each direction keeps a
bracket [lo, hi] with C(lo) < eps < C(hi) (lo = 0 at the anchor, where C = 0) and steps in log-log
space, where C ~ t^2 near the anchor:

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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

CONVERGED = "converged"
UNBOUNDED = "unbounded"  # C < eps all the way to the measure's reach (radius = that reach)
NONFINITE = "nonfinite"  # the ray leaves through a boundary where C becomes NaN/inf
JUMP = "jump"  # C jumps over eps at a point (the bracket closed without |C - eps| <= rtol eps)
NOT_CONVERGED = "not_converged"  # the evaluation budget ran out; radius interpolated in the bracket
# Set by the estimator, not the search: a box-prior ray that stays inside the neighborhood until it
# leaves the box (its radius is the box's exit point).
CLIPPED = "clipped"
STATUS_NAMES = (CONVERGED, UNBOUNDED, NONFINITE, JUMP, NOT_CONVERGED, CLIPPED)
# What a user should read into a status that is not "converged" (for warnings and notes).
INTEGRATED_EXACTLY = "the ray stays inside until the measure runs out; handled exactly"
INFINITE_VOLUME = "never reached the cutoff: infinite Lebesgue volume"

_DEFAULT_SLOPE = 2.0  # C ~ (t^2 / 2) w^T F w near the anchor
_MAX_GROWTH = 1e6  # largest factor one extrapolation may move a probe
_ZERO_COST_GROWTH = 100.0  # factor applied when C is exactly 0 (no slope information)
_NONFINITE_SHRINK = 0.1  # factor applied from a NaN/inf cost with no finite lower end
_BRACKET_COLLAPSED = 1e-12  # log-width of a bracket that cannot shrink further


@dataclass
class SearchOutcome:
    """Per direction (B,): radius, cost at the last probe, status name, evaluations, non-monotone flag,
    the local log-log slope of C at the radius (NaN where the search did not converge), every probe
    made so far as (rows, radii, costs) rounds, to seed a search of another cutoff, and the wall time
    spent inside ``evaluate`` over this search's rounds (the rest is the search's own bookkeeping)."""

    radii: torch.Tensor
    deltas: torch.Tensor
    status: list[str]
    n_evals: torch.Tensor
    nonmonotone: torch.Tensor
    slopes: torch.Tensor
    history: list = field(default_factory=list, repr=False)
    rounds: int = 0
    seconds_evaluating: float = 0.0


def _local_slope(t1, c1, t2, c2, default: float = _DEFAULT_SLOPE):
    """log-log slope between two probes, ``default`` where it is undefined or implausible."""
    with torch.no_grad():
        slope = torch.log(c1 / c2) / torch.log(t1 / t2)
    ok = torch.isfinite(slope) & (slope > 0.05)
    return torch.where(ok, slope.clamp(0.25, 16.0), torch.full_like(slope, default))


class _Brackets:
    """Per-direction search state for one cutoff: the bracket, Illinois weights, the result so far."""

    def __init__(self, n: int, cap: torch.Tensor, eps: float, rtol: float, slope_hint: float):
        f64 = dict(dtype=torch.float64)
        self.eps, self.rtol, self.slope_hint, self.cap = eps, rtol, slope_hint, cap
        self.lo_t, self.lo_c = torch.zeros(n, **f64), torch.zeros(n, **f64)  # the anchor: C(0) = 0
        self.hi_t, self.hi_c = torch.full((n,), math.inf, **f64), torch.full((n,), math.inf, **f64)
        self.hi_known = torch.zeros(n, dtype=torch.bool)  # hi_c inf: unknown or non-finite
        self.last_side = torch.zeros(n, dtype=torch.int8)  # Illinois: which end moved last (-1 lo, +1 hi)
        self.lo_weight, self.hi_weight = torch.ones(n, **f64), torch.ones(n, **f64)
        self.prev_t, self.prev_c = torch.full((n,), math.nan, **f64), torch.full((n,), math.nan, **f64)
        self.last_t, self.last_c = torch.full((n,), math.nan, **f64), torch.full((n,), math.nan, **f64)
        self.radii, self.deltas = torch.full((n,), math.nan, **f64), torch.full((n,), math.nan, **f64)
        self.slopes = torch.full((n,), math.nan, **f64)
        self.status = torch.full((n,), -1, dtype=torch.int64)
        self.nonmonotone = torch.zeros(n, dtype=torch.bool)
        self.seen = torch.zeros(n, dtype=torch.bool)

    def absorb(self, rows: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Take in probes (t, C) of ``rows``; returns which of them are finished."""
        eps = self.eps
        self.seen[rows] = True
        finite = torch.isfinite(c)
        hit = finite & ((c - eps).abs() <= self.rtol * eps)
        below = finite & (c < eps) & ~hit
        above = ~finite | ((c > eps) & ~hit)
        lo_t, lo_c, hi_t, hi_c = self.lo_t[rows], self.lo_c[rows], self.hi_t[rows], self.hi_c[rows]
        self.nonmonotone[rows] |= (below & (c < lo_c) & (t > lo_t)) | (
            above & finite & (c > hi_c) & (t < hi_t) & torch.isfinite(hi_c)
        )
        # A probe beyond the current bracket says nothing new about the first crossing.
        below &= ~(self.hi_known[rows] & (t >= hi_t))
        above &= ~(t <= lo_t)

        if bool(hit.any()):  # converged: move the radius along the local slope onto eps
            r = rows[hit]
            th, ch = t[hit], c[hit]
            lo_ok = self.lo_c[r] > 0
            hi_ok = self.hi_known[r] & torch.isfinite(self.hi_c[r])
            use_lo = torch.where(ch > eps, lo_ok | ~hi_ok, ~hi_ok)  # prefer the end across eps
            t_end = torch.where(use_lo, self.lo_t[r], self.hi_t[r])
            c_end = torch.where(use_lo, self.lo_c[r], self.hi_c[r])
            slope = _local_slope(th, ch, t_end, c_end, self.slope_hint)
            self.radii[r] = th * (eps / ch) ** (1.0 / slope)
            self.slopes[r], self.deltas[r] = slope, ch
            self.status[r] = STATUS_NAMES.index(CONVERGED)

        rows_b, rows_a = rows[below], rows[above]
        self.lo_t[rows_b], self.lo_c[rows_b] = t[below], c[below]
        self.hi_t[rows_a] = t[above]
        self.hi_c[rows_a] = torch.where(finite[above], c[above], torch.full_like(c[above], math.inf))
        self.hi_known[rows_a] = True
        # Illinois: an end kept twice in a row gets its residual halved so the secant keeps moving.
        self.lo_weight[rows_b] = 1.0
        self.hi_weight[rows_a] = 1.0
        self.hi_weight[rows_b] = torch.where(self.last_side[rows_b] == -1, self.hi_weight[rows_b] * 0.5, self.hi_weight[rows_b])
        self.lo_weight[rows_a] = torch.where(self.last_side[rows_a] == 1, self.lo_weight[rows_a] * 0.5, self.lo_weight[rows_a])
        self.last_side[rows_b], self.last_side[rows_a] = -1, 1
        # The two latest informative probes give the local slope for the next extrapolation.
        r = rows[below | (above & finite)]
        keep = below | (above & finite)
        self.prev_t[r], self.prev_c[r] = self.last_t[r], self.last_c[r]
        self.last_t[r], self.last_c[r] = t[keep], c[keep]

        at_cap = below & (t >= self.cap[rows])  # inside all the way to the measure's reach
        if bool(at_cap.any()):
            r = rows[at_cap]
            self.radii[r], self.deltas[r] = self.cap[r], c[at_cap]
            self.status[r] = STATUS_NAMES.index(UNBOUNDED)
        return self.status[rows] >= 0

    def close_stuck(self, rows: torch.Tensor, n_evals: torch.Tensor, max_evals: int) -> torch.Tensor:
        """Finish brackets that cannot shrink further or are out of budget; returns which rows remain."""
        width = torch.log(self.hi_t[rows] / self.lo_t[rows])
        collapsed = self.hi_known[rows] & (self.lo_t[rows] > 0) & (width < _BRACKET_COLLAPSED)
        out_of_budget = (n_evals[rows] >= max_evals) & ~collapsed
        done = collapsed | out_of_budget
        if bool(done.any()):
            d = rows[done]
            lo_t, lo_c, hi_t, hi_c = self.lo_t[d], self.lo_c[d], self.hi_t[d], self.hi_c[d]
            code_collapsed = torch.where(
                ~torch.isfinite(hi_c),
                torch.full_like(d, STATUS_NAMES.index(NONFINITE)),
                torch.full_like(d, STATUS_NAMES.index(JUMP)),
            )
            self.status[d] = torch.where(collapsed[done], code_collapsed, torch.full_like(d, STATUS_NAMES.index(NOT_CONVERGED)))
            self.radii[d] = _bracket_estimate(lo_t, lo_c, hi_t, hi_c, self.hi_known[d], self.eps)
            best_lo = (lo_t > 0) & ((self.eps - lo_c) <= (hi_c - self.eps))
            self.deltas[d] = torch.where(best_lo | ~torch.isfinite(hi_c), lo_c, hi_c)
        return rows[~done]

    def next_probe(self, rows: torch.Tensor) -> torch.Tensor:
        return _next_probe(self, rows)


def search_radii(
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial: torch.Tensor,
    cap: torch.Tensor,
    cutoff: float,
    *,
    rtol: float = 1e-2,
    max_evals: int = 64,
    slope_hint: float = _DEFAULT_SLOPE,
    history: list | None = None,
) -> SearchOutcome:
    """Find the radii of a batch of directions.

    evaluate(rows, radii): costs (k,) at theta0 + radii * w_hat[rows]; rows int64 (k,), radii float64 (k,).
    initial: (B,) first probe (NaN: step from ``history``); cap: (B,) largest radius worth probing.
    slope_hint: the log-log slope of C assumed until a direction has measured its own (2 near the
        anchor; the estimator passes the typical slope its first directions found at the cutoff).
    history: the probes of earlier searches along the same directions (``SearchOutcome.history``, e.g.
        for another cutoff): they set the first brackets, and a direction whose earlier probe already
        lies within rtol of this cutoff converges without a new evaluation.
    """
    eps = float(cutoff)
    cap = cap.double().clone()
    n = cap.numel()
    state = _Brackets(n, cap, eps, rtol, slope_hint)
    history = list(history or [])
    for rows, t, c in history:
        state.absorb(rows, t, c)
    n_evals = torch.zeros(n, dtype=torch.int64)
    active = torch.nonzero(state.status < 0).reshape(-1)
    probe = torch.minimum(initial.double().clone(), cap)
    probe = torch.where(probe > 0, probe, torch.minimum(torch.ones_like(cap), cap))
    # Where earlier probes exist, a first probe outside their bracket (or none: NaN) is replaced by
    # the bracket's own next step.
    resumed = active[state.seen[active]]
    if resumed.numel():
        guess = probe[resumed]
        inside = (guess > state.lo_t[resumed]) & (guess < state.hi_t[resumed]) & ~torch.isnan(initial[resumed])
        probe[resumed] = torch.where(inside, guess, state.next_probe(resumed))

    rounds, seconds_evaluating = 0, 0.0
    while active.numel():
        t = probe[active]
        started = time.perf_counter()
        # The round's one host synchronization: the evaluators leave their costs on the device.
        c = torch.as_tensor(evaluate(active, t)).detach().to("cpu", torch.float64).reshape(-1)
        seconds_evaluating += time.perf_counter() - started  # costs on the CPU: device work included
        rounds += 1
        if c.numel() != active.numel():
            raise ValueError(f"the cost function returned {c.numel()} values for {active.numel()} parameter vectors")
        n_evals[active] += 1
        history.append((active, t, c))
        finished = state.absorb(active, t, c)
        rows = state.close_stuck(active[~finished], n_evals, max_evals)
        probe[rows] = state.next_probe(rows)
        active = rows

    names = [STATUS_NAMES[k] for k in state.status.tolist()]
    return SearchOutcome(
        state.radii, state.deltas, names, n_evals, state.nonmonotone, state.slopes, history, rounds, seconds_evaluating
    )


def _bracket_estimate(lo_t, lo_c, hi_t, hi_c, hi_known, eps):
    """Best radius from a bracket that did not converge: log-log interpolation, else its geometric mean."""
    usable = hi_known & (lo_t > 0) & (lo_c > 0) & torch.isfinite(hi_c)
    x_lo, x_hi = torch.log(lo_t), torch.log(hi_t)
    frac = (math.log(eps) - torch.log(lo_c)) / (torch.log(hi_c) - torch.log(lo_c))
    interpolated = torch.exp(x_lo + frac.clamp(0, 1) * (x_hi - x_lo))
    geometric = torch.where(lo_t > 0, torch.sqrt(lo_t * hi_t), hi_t)
    result = torch.where(usable, interpolated, geometric)
    return torch.where(hi_known, result, lo_t)


def _next_probe(state: _Brackets, rows: torch.Tensor) -> torch.Tensor:
    lt, lc, ht, hc, known = state.lo_t[rows], state.lo_c[rows], state.hi_t[rows], state.hi_c[rows], state.hi_known[rows]
    pt, pc = state.prev_t[rows], state.prev_c[rows]
    eps, log_eps = state.eps, math.log(state.eps)

    # Growing: no point outside yet. Slope from the last two inside points when both are informative.
    slope_up = _local_slope(lt, lc, pt, pc, state.slope_hint)
    grow = torch.where(lc > 0, (eps / lc) ** (1.0 / slope_up), torch.full_like(lc, _ZERO_COST_GROWTH))
    grown = torch.minimum(lt * grow.clamp(1.0 + 1e-9, _MAX_GROWTH), state.cap[rows])

    # Shrinking: outside at hi, nothing positive inside yet.
    slope_down = _local_slope(ht, hc, pt, pc, state.slope_hint)
    shrink = torch.where(torch.isfinite(hc), (eps / hc) ** (1.0 / slope_down), torch.full_like(hc, _NONFINITE_SHRINK))
    shrunk = ht * shrink.clamp(1.0 / _MAX_GROWTH, 1.0 - 1e-9)

    # Bracketed: Illinois secant in (log t, log C/eps), bisection in log t where an end gives no slope.
    x_lo, x_hi = torch.log(lt), torch.log(ht)
    y_lo = (torch.log(lc) - log_eps) * state.lo_weight[rows]
    y_hi = (torch.log(hc) - log_eps) * state.hi_weight[rows]
    secant = x_lo - y_lo * (x_hi - x_lo) / (y_hi - y_lo)
    width = x_hi - x_lo
    secant = torch.minimum(torch.maximum(secant, x_lo + 1e-3 * width), x_hi - 1e-3 * width)
    finite_ends = (lc > 0) & torch.isfinite(hc)
    x_new = torch.where(finite_ends & torch.isfinite(secant), secant, 0.5 * (x_lo + x_hi))
    bracketed = torch.exp(x_new)

    return torch.where(~known, grown, torch.where(lt > 0, bracketed, shrunk))


def status_counts_text(status: list[str], explanations: dict[str, str] | None = None) -> list[str]:
    """["3 unbounded (why)", "1 jump"]: the directions that did not simply converge, by status name.

    explanations: a note per status name (e.g. ``{UNBOUNDED: INTEGRATED_EXACTLY}``), shown after its count.
    """
    counts = Counter(s for s in status if s != CONVERGED)
    explanations = explanations or {}
    return [
        f"{count} {name}" + (f" ({explanations[name]})" if name in explanations else "")
        for name, count in sorted(counts.items())
    ]
