"""``estimate_volume``: the local volume of a cost function around an anchor, on the pure-PyTorch path.

For each direction index i (the stream g(seed, i) of ``philox``), the unit direction is
w_hat = P g / |P g|, its radius r solves C(theta0 + r w_hat) = eps (``search``), and its estimate is
``measure.log_ray_measures(r) - D log|w| + log det P`` (``measures``). The volume is the log-mean-exp.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .measures import DirectionStats, make_measure
from .ops import get_backend
from .philox import seed_to_key
from .preconditioners import log_det, normalize_preconditioner
from .progress import ProgressBar
from .result import VolumeResult, log_mean_exp
from .search import CONVERGED, UNBOUNDED, search_radii

CLIPPED = "clipped"  # a box-prior ray that stays inside the neighborhood until it leaves the box
PILOT_DIRECTIONS = 8  # directions searched first; their typical radius starts every later search
_DEFAULT_BATCH_ELEMENTS = 1 << 24
# |C(anchor)| must stay below this fraction of the cutoff: more is a wrong cost, or rounding noise
# (float32 KL is ~1e-9 at the anchor) too large to resolve the cutoff within rtol.
ANCHOR_COST_TOLERANCE = 0.05  # batch_size=None keeps B * D near this many parameters


def _check_anchor(anchor) -> torch.Tensor:
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise TypeError(f"anchor must be a floating-point torch.Tensor, got {type(anchor).__name__}")
    flat = anchor.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("anchor is empty: there are no parameters to perturb")
    bad = ~torch.isfinite(flat)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"the anchor holds {int(bad.sum())} NaN/inf values (first at index {k}: {float(flat[k])!r}); "
            "the local volume of a non-finite network is undefined"
        )
    return flat


def check_cutoff(cutoff) -> float:
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise TypeError(f"cutoff must be a positive number, got {cutoff!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cutoff must be finite and positive (eps in nats for the KL neighborhood), got {cutoff!r}")
    return value


def check_cutoffs(cutoff) -> list[float]:
    """One cutoff or a sequence of them (each finite and positive), as a list of floats."""
    values = [check_cutoff(c) for c in cutoff] if isinstance(cutoff, (list, tuple, torch.Tensor)) else [check_cutoff(cutoff)]
    if not values:
        raise ValueError("cutoff is an empty list; pass at least one positive cutoff")
    return values


def check_run_options(n_samples, rtol, batch_size, seed) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer (number of directions), got {n_samples!r}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1) (relative tolerance on |C - eps| / eps), got {rtol!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    seed_to_key(seed)


def direction_batches(n_samples: int, batch_size: int, pilot: int = PILOT_DIRECTIONS):
    """Index ranges: direction 0, the rest of the pilot, then the others, each at most ``batch_size`` long.

    The split depends on ``batch_size`` but the search of every direction does not: direction 0 starts
    from the initial radius, the other pilot directions from its radius, and all later ones from the
    pilot's typical radius and slope.
    """
    pilot = min(pilot, n_samples)
    for lo, hi in ((0, min(1, n_samples)), (1, pilot), (pilot, n_samples)):
        for start in range(lo, hi, batch_size):
            yield start, min(start + batch_size, hi)


def typical_radius(radii: torch.Tensor, fallback: float) -> float:
    """Geometric median of the finite positive radii (radii concentrate in high dimension)."""
    good = radii[torch.isfinite(radii) & (radii > 0)]
    return float(torch.exp(torch.log(good).median())) if good.numel() else fallback


def typical_slope(slopes: torch.Tensor, fallback: float) -> float:
    """Median of the finite log-log slopes measured at the cutoff."""
    good = slopes[torch.isfinite(slopes)]
    return float(good.median()) if good.numel() else fallback


class DirectionBatch:
    """A batch of directions w_hat = P g / |P g|, never stored: the backend's kernels regenerate g.

    ``stats`` come from one pass of ``direction_stats``; ``points`` writes theta0 + r w_hat with
    ``perturb_`` as anchor + (r / |P g|) * P g.
    """

    def __init__(self, backend, seed: int, indices: torch.Tensor, anchor: torch.Tensor, precond, weights, bounds):
        self.backend, self.seed, self.precond, self.anchor = backend, seed, precond, anchor
        self.indices = indices.to(anchor.device)
        stats = backend.direction_stats(seed, self.indices, anchor, precond, weights, bounds, 0)
        self.stats = DirectionStats.from_tensor(stats.to("cpu", torch.float64))
        self.inverse_norm = torch.rsqrt(self.stats.sq_norm_pg)

    def points(self, rows: torch.Tensor, radii: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """base + r w_hat for the given rows (base: the anchor by default): (k, D) in base's dtype."""
        base = self.anchor if base is None else base
        scales = (radii.double() * self.inverse_norm[rows]).to(base.device)
        out = torch.empty(rows.numel(), base.numel(), dtype=base.dtype, device=base.device)
        self.backend.perturb_(out, base, self.precond, self.seed, self.indices[rows.to(base.device)], scales, 0)
        return out

    def unit_vectors(self, dtype=torch.float32) -> torch.Tensor:
        """The batch's w_hat as a (B, D) tensor (for evaluators that precompute per-direction work)."""
        zeros = torch.zeros(self.anchor.numel(), dtype=dtype, device=self.anchor.device)
        return self.points(torch.arange(self.indices.numel()), torch.ones(self.indices.numel()), base=zeros)


class PointCost:
    """Evaluates a cost of whole parameter vectors, ``fn((k, D) points) -> (k,)``, at the probes.

    The estimator calls ``start_batch`` with each ``DirectionBatch`` and then ``self(rows, radii)``
    for the costs at theta0 + radii * w_hat[rows]; evaluators with cheaper ways to reach those costs
    (``fast_mlp``) implement the same three methods.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a (B, D) batch -> (B,) costs), got {type(fn).__name__}")
        self.fn = fn
        self.batch: DirectionBatch | None = None

    def start_batch(self, batch: DirectionBatch) -> None:
        self.batch = batch

    def anchor_cost(self, anchor: torch.Tensor) -> float:
        return float(self.costs(anchor.reshape(1, -1))[0])

    def __call__(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        return self.costs(self.batch.points(rows, radii))

    def costs(self, points: torch.Tensor) -> torch.Tensor:
        out = self.fn(points)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.numel() != points.shape[0]:
            raise ValueError(f"fn returned shape {tuple(out.shape)} for a batch of {points.shape[0]}; it must return (B,)")
        return out.detach().reshape(-1).to("cpu", torch.float64)


def estimate_volume(
    fn: Callable[[torch.Tensor], torch.Tensor],
    anchor: torch.Tensor,
    *,
    cutoff: float | Sequence[float],
    n_samples: int,
    measure: str = "gaussian",
    sigma=None,
    bounds=None,
    preconditioner: torch.Tensor | None = None,
    seed: int = 0,
    rtol: float = 1e-2,
    batch_size: int | None = None,
    progress: bool = False,
    initial_radius: float = 1.0,
    max_evals: int = 64,
    backend: str = "auto",
) -> VolumeResult:
    """Estimate the local volume of {theta : fn(theta) <= cutoff} around ``anchor``.

    fn: maps a (B, D) batch of parameter vectors to a (B,) tensor of costs, with fn(anchor) = 0 (or an
        evaluator with ``start_batch``/``anchor_cost``/``__call__(rows, radii)``, as ``PointCost``).
    anchor: (D,) (any shape; flattened) floating tensor. cutoff: eps > 0, or a list of cutoffs searched
        together along the same directions (each search starts from the probes of the one before);
        then a list of results is returned, one per cutoff in the given order.
    measure: "gaussian" (N(0, sigma^2 I) about the origin; sigma a scalar or (D,) tensor; None means the
        RMS of the anchor - the paper recommends the initialization scale) or "uniform" (Lebesgue; with
        ``bounds`` a scalar or (D,) half-widths, the normalized uniform prior on that box).
    preconditioner: None (isotropic) or a positive (D,) diagonal, e.g. ``adam_preconditioner(...)``.
    seed: direction i is always the same vector for the same seed (any batch size or device).
    rtol: a radius is accepted when |C - eps| <= rtol * eps. initial_radius: first probe of the pilot.
    backend: "auto", "reference", "cpu", "cuda" or "triton": the kernels that generate, measure and
        apply the directions (``localvol_fast.available_backends()``); all give the same directions.
    Returns a ``VolumeResult`` (log volume in nats), or a list of them for a list of cutoffs.
    """
    evaluator = fn if hasattr(fn, "start_batch") else PointCost(fn)
    flat = _check_anchor(anchor)
    multiple = isinstance(cutoff, (list, tuple)) or (isinstance(cutoff, torch.Tensor) and cutoff.dim() == 1)
    eps_list = check_cutoffs(cutoff)
    eps = min(eps_list)
    check_run_options(n_samples, rtol, batch_size, seed)
    dim = flat.numel()
    measure_obj = make_measure(measure, flat, sigma=sigma, bounds=bounds)
    precond = None
    if preconditioner is not None:
        if not isinstance(preconditioner, torch.Tensor) or preconditioner.numel() != dim:
            size = preconditioner.numel() if isinstance(preconditioner, torch.Tensor) else type(preconditioner).__name__
            raise ValueError(f"preconditioner must be a (D,) = ({dim},) tensor of positive values, got {size}")
        precond = normalize_preconditioner(preconditioner).to(flat.device)
    log_det_p = log_det(precond)
    ops = get_backend(backend, flat.device)
    to_device = lambda t: None if t is None else t.to(flat.device)  # noqa: E731
    weights, bounds_vector = to_device(measure_obj.weights), to_device(measure_obj.bounds)
    if batch_size is None:
        batch_size = max(1, min(n_samples, 256, _DEFAULT_BATCH_ELEMENTS // dim))

    anchor_cost = evaluator.anchor_cost(flat)
    if not (math.isfinite(anchor_cost) and abs(anchor_cost) <= ANCHOR_COST_TOLERANCE * eps):
        raise ValueError(
            f"fn(anchor) = {anchor_cost!r}, but the cost must be 0 at the anchor (e.g. L(theta) - L(theta0) "
            f"or KL(anchor || theta)), at least below {ANCHOR_COST_TOLERANCE:g} x the cutoff {eps!r}. If the "
            "cost is right, this is its rounding noise: evaluate it in higher precision or use a larger cutoff"
        )

    started = time.perf_counter()
    # Searched from the largest cutoff down: each search starts from the probes of the previous one.
    tracks = [_CutoffTrack(e, float(initial_radius)) for e in sorted(set(eps_list))]
    bar = ProgressBar(n_samples, enabled=progress)
    for lo, hi in direction_batches(n_samples, batch_size):
        indices = torch.arange(lo, hi, dtype=torch.int64)
        batch = DirectionBatch(ops, seed, indices, flat, precond, weights, bounds_vector)
        evaluator.start_batch(batch)
        cap, history, evals, previous = measure_obj.radius_cap(batch.stats), [], 0.0, None
        for track in tracks:
            outcome = search_radii(
                evaluator,
                track.first_probes(hi - lo, previous),
                cap,
                track.eps,
                rtol=rtol,
                max_evals=max_evals,
                slope_hint=track.slope_hint,
                history=history,
            )
            if previous is not None:
                track.previous_radii.append(previous)
            history, previous = outcome.history, outcome.radii
            evals += float(outcome.n_evals.double().mean())
            track.add(DirectionRecords.of_search(indices, batch.stats, outcome, measure_obj, log_det_p), hi, n_samples)
        bar.update(hi - lo, evals=evals, log_volume=log_mean_exp(torch.cat([r.estimates for r in tracks[-1].records])))
    bar.close()
    seconds = time.perf_counter() - started
    by_cutoff = {t.eps: t for t in tracks}
    results = []
    for e in eps_list:
        result = _assemble(DirectionRecords.concat(by_cutoff[e].records), measure_obj, dim, e, seconds)
        result.config.update(seed=seed, rtol=rtol, preconditioned=precond is not None, backend=ops.name)
        if len(eps_list) > 1:
            result.info["cutoffs_searched_together"] = list(eps_list)
        results.append(result)
    return results if multiple else results[0]


class _CutoffTrack:
    """The directions finished for one cutoff, and the pilot's typical radius and slope there."""

    def __init__(self, eps: float, initial_radius: float):
        self.eps, self.initial_radius = eps, initial_radius
        self.start_radius, self.slope_hint, self.ratio = initial_radius, 2.0, math.nan
        self.records: list[DirectionRecords] = []
        self.previous_radii: list[torch.Tensor] = []  # the radii at the next larger cutoff, if any

    def first_probes(self, n: int, previous: torch.Tensor | None) -> torch.Tensor:
        """A direction's radius at the previous cutoff times the pilot's typical ratio, else the typical radius."""
        if previous is None or math.isnan(self.ratio):
            return torch.full((n,), math.nan if previous is not None else self.start_radius, dtype=torch.float64)
        return torch.where(torch.isfinite(previous), previous * self.ratio, torch.full_like(previous, math.nan))

    def add(self, records: "DirectionRecords", end: int, n_samples: int) -> None:
        self.records.append(records)
        done = DirectionRecords.concat(self.records)
        if end == 1:  # the rest of the pilot starts from direction 0's radius
            self.start_radius = typical_radius(done.radii, self.start_radius)
        if end == min(PILOT_DIRECTIONS, n_samples):
            # Radii concentrate in high dimension, and so do the slope of log C at the cutoff and the ratio
            # of radii at two cutoffs: the pilot's typical values start every later search (for any batch size).
            self.start_radius = typical_radius(done.radii, self.initial_radius)
            self.slope_hint = typical_slope(done.slopes, self.slope_hint)
            if self.previous_radii:
                ratios = done.radii / torch.cat(self.previous_radii)
                self.ratio = typical_radius(ratios, math.nan)


@dataclass
class DirectionRecords:
    """Finished directions (each field (n,)): what a run keeps of each, in the order they finished."""

    indices: torch.Tensor
    estimates: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    props: torch.Tensor
    n_evals: torch.Tensor
    nonmonotone: torch.Tensor
    slopes: torch.Tensor
    status: list[str]

    @classmethod
    def of_search(cls, indices, stats: DirectionStats, outcome, measure_obj, log_det_p: float) -> "DirectionRecords":
        """Estimates of searched directions: log ray measure - D log|P u| + log det P."""
        unbounded = torch.tensor([s == UNBOUNDED for s in outcome.status], dtype=torch.bool)
        radii, status = outcome.radii, list(outcome.status)
        if measure_obj.is_box:  # the ray ends at the box: the radius is its exit point
            status = [CLIPPED if s == UNBOUNDED else s for s in status]
        else:
            radii = torch.where(unbounded, torch.full_like(radii, math.inf), radii)
        props = stats.props
        estimates = measure_obj.log_ray_measures(radii, stats) - measure_obj.dim * torch.log(props) + log_det_p
        return cls(
            indices, estimates, radii, outcome.deltas, props, outcome.n_evals, outcome.nonmonotone, outcome.slopes, status
        )

    @classmethod
    def concat(cls, parts: list["DirectionRecords"]) -> "DirectionRecords":
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__ if f != "status"}
        return cls(**tensors, status=[s for p in parts for s in p.status])


def _assemble(records: DirectionRecords, measure_obj, dim: int, eps: float, seconds: float) -> VolumeResult:
    notes = [measure_obj.outside_reason] if getattr(measure_obj, "outside_reason", None) else []
    result = VolumeResult(
        estimates=records.estimates,
        radii=records.radii,
        deltas=records.deltas,
        props=records.props,
        status=records.status,
        n_evals=records.n_evals,
        indices=records.indices,
        nonmonotone=records.nonmonotone,
        dim=dim,
        cutoff=eps,
        measure=measure_obj.describe(),
        info={"seconds": seconds, "notes": notes},
    )
    _warn_once(result, measure_obj)
    return result


def _warn_once(result: VolumeResult, measure_obj) -> None:
    """One summary warning for every direction that did not simply converge."""
    counts = {k: v for k, v in result.status_counts().items() if k != CONVERGED}
    problems = []
    for name, count in sorted(counts.items()):
        if name == UNBOUNDED and measure_obj.name == "uniform":
            problems.append(f"{count} never reached the cutoff (infinite Lebesgue volume)")
        elif name in (UNBOUNDED, CLIPPED):
            problems.append(f"{count} {name} (the ray stays inside until the measure runs out; handled exactly)")
        else:
            problems.append(f"{count} {name}")
    if bool(result.nonmonotone.any()):
        problems.append(f"{int(result.nonmonotone.sum())} with non-monotone costs (first crossing used)")
    if result.info["notes"]:
        problems.extend(result.info["notes"])
    if problems:
        warnings.warn(
            f"local volume: of {result.n_samples} directions, " + "; ".join(problems) + ". See result.status.",
            RuntimeWarning,
            stacklevel=4,
        )

