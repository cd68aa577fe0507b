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
from pathlib import Path

import torch

from .measures import DirectionStats, make_measure
from .distributed import gather, owns, process_group
from .journal import RunJournal, anchor_fingerprint, records_to_rows, rows_to_fields
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


def check_anchor(anchor) -> torch.Tensor:
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise TypeError(f"anchor must be a floating-point torch.Tensor, got {type(anchor).__name__}")
    flat = anchor.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("anchor is empty: there are no parameters to perturb")
    chunk = 1 << 22  # checked in pieces: no full-size temporary for a billion-parameter anchor
    for lo in range(0, flat.numel(), chunk):
        bad = ~torch.isfinite(flat[lo : lo + chunk])
        if bool(bad.any()):
            k = lo + int(bad.nonzero()[0])
            raise ValueError(
                f"the anchor holds NaN/inf values (first at index {k}: {float(flat[k])!r}); "
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


def direction_batches(indices: list[int], batch_size: int, pilot: int = PILOT_DIRECTIONS):
    """The directions to run as int64 batches: direction 0, the rest of the pilot, then the others,
    each at most ``batch_size`` long.

    The split depends on ``batch_size`` but the search of every direction does not: direction 0 starts
    from the initial radius, the other pilot directions from its radius, and all later ones from the
    pilot's typical radius and slope.
    """
    groups = ([i for i in indices if i == 0], [i for i in indices if 0 < i < pilot], [i for i in indices if i >= pilot])
    for group in groups:
        for start in range(0, len(group), batch_size):
            yield torch.tensor(group[start : start + batch_size], dtype=torch.int64)


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
        indices, scales = self.probe_arguments(rows, radii)
        out = torch.empty(rows.numel(), base.numel(), dtype=base.dtype, device=base.device)
        self.backend.perturb_(out, base, self.precond, self.seed, indices, scales, 0)
        return out

    def probe_arguments(self, rows: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The direction indices and the scales r / |P g| of ``perturb_`` for host ``rows`` and ``radii``,
        on the anchor's device. Call it before queuing a round's work: the copies do not synchronize the
        stream, but one from pageable memory may still wait for work already queued."""
        device = self.anchor.device
        scales = (radii.double() * self.inverse_norm[rows]).to(device, non_blocking=True)
        return self.indices[rows.to(device, non_blocking=True)], scales

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
        # A copy: the cost may hand the vector to a model that writes into its own weights.
        return float(self.costs(anchor.reshape(1, -1).clone())[0])

    def __call__(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        return self.costs(self.batch.points(rows, radii))

    def costs(self, points: torch.Tensor) -> torch.Tensor:
        """(k,) float64 costs, left on fn's device: the search brings them to the host once per round."""
        out = self.fn(points)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.numel() != points.shape[0]:
            raise ValueError(f"fn returned shape {tuple(out.shape)} for a batch of {points.shape[0]}; it must return (B,)")
        return out.detach().reshape(-1).to(torch.float64)


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
    output=None,
    resume: bool = False,
    distributed: bool = False,
    run_info: dict | None = None,
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
    output: a JSON-lines journal (e.g. "run.jsonl") that gets every finished batch of directions;
        resume=True continues the run it holds (refusing one written with another configuration) and
        gives exactly the uninterrupted result. run_info: extra configuration a resumed run must match.
    distributed: shard the directions over the processes of torch.distributed (start with torchrun);
        every rank gets the whole result, equal to a single-process run with the same seed.
    Returns a ``VolumeResult`` (log volume in nats), or a list of them for a list of cutoffs.
    """
    evaluator = fn if hasattr(fn, "start_batch") else PointCost(fn)
    flat = check_anchor(anchor)
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
    rank, world_size = process_group(distributed)
    pilot = PILOT_DIRECTIONS  # fixed, so that a run extended later searches its directions the same way
    # Searched from the smallest cutoff up: each search starts from the probes of the one before.
    tracks: list[_CutoffTrack] = []
    for e in sorted(set(eps_list)):
        tracks.append(_CutoffTrack(e, float(initial_radius), pilot, tracks[-1] if tracks else None))
    journal = None
    if output is not None:
        config = {
            "seed": seed, "cutoffs": sorted(set(eps_list)), "measure": measure_obj.describe(), "rtol": rtol,
            "max_evals": max_evals, "initial_radius": float(initial_radius), "backend": ops.name,
            "anchor": anchor_fingerprint(flat), "preconditioner": None if precond is None else anchor_fingerprint(precond),
            **(run_info or {}),
        }
        journal = _open_journal(output, config, resume, rank, world_size)
    done = journal.done_indices(eps_list) if journal is not None else set()
    for track in tracks:  # directions finished by an earlier run count as done (and set the pilot's figures)
        if done:
            track.add(DirectionRecords(**rows_to_fields(journal.records(track.eps, sorted(done)))))
    todo = [i for i in range(n_samples) if i not in done and owns(i, rank, world_size, pilot)]
    bar = ProgressBar(len(todo), enabled=progress and rank == 0)
    new_parts = {t.eps: [] for t in tracks}
    rounds, seconds_evaluating = 0, 0.0
    for indices in direction_batches(todo, batch_size, pilot):
        batch = DirectionBatch(ops, seed, indices, flat, precond, weights, bounds_vector)
        evaluator.start_batch(batch)
        cap, history, evals, previous = measure_obj.radius_cap(batch.stats), [], 0.0, None
        for track in tracks:
            outcome = search_radii(
                evaluator,
                track.first_probes(indices, previous),
                cap,
                track.eps,
                rtol=rtol,
                max_evals=max_evals,
                slope_hint=track.slope_hint,
                history=history,
            )
            history, previous = outcome.history, outcome.radii
            rounds, seconds_evaluating = rounds + outcome.rounds, seconds_evaluating + outcome.seconds_evaluating
            evals += float(outcome.n_evals.double().mean())
            records = DirectionRecords.of_search(indices, batch.stats, outcome, measure_obj)
            track.add(records)
            new_parts[track.eps].append(records)
        if journal is not None:  # a batch is journaled only once every cutoff is done
            for track in tracks:
                finished = new_parts[track.eps][-1]
                journal.append(track.eps, finished, finished.estimates(measure_obj, log_det_p))
        running = log_mean_exp(tracks[0].done().estimates(measure_obj, log_det_p)) if progress else math.nan
        bar.update(indices.numel(), evals=evals, log_volume=running)
    bar.close()
    seconds = time.perf_counter() - started
    by_cutoff = {t.eps: t for t in tracks}
    results = []
    for e in eps_list:
        records = by_cutoff[e].done()
        if world_size > 1:  # everyone's directions, on every rank
            rows = gather(records_to_rows(DirectionRecords.concat(new_parts[e])) if new_parts[e] else [], world_size)
            records = DirectionRecords.concat([records, DirectionRecords(**rows_to_fields(rows))] if rows else [records])
        result = _assemble(records.by_index(), measure_obj, e, log_det_p, seconds)
        result.config.update(seed=seed, rtol=rtol, preconditioned=precond is not None, backend=ops.name)
        result.info["processes"] = world_size
        # This process's search rounds and the time inside them spent evaluating costs: the rest of
        # "seconds" is setup and the search's bookkeeping (host side, between device evaluations).
        result.info.update(search_rounds=rounds, seconds_evaluating=seconds_evaluating)
        if len(eps_list) > 1:
            result.info["cutoffs_searched_together"] = list(eps_list)
        results.append(result)
    return results if multiple else results[0]


def _open_journal(output, config: dict, resume: bool, rank: int, world_size: int) -> RunJournal:
    """Rank r of several writes its own file beside ``output``; a resumed run reads all of them."""
    path = Path(output)
    own = path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    others = [p for p in [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))] if p != own]
    return RunJournal(own, config, resume, extra_paths=others)


class _CutoffTrack:
    """The directions finished for one cutoff, and the pilot's typical radius, slope and radius ratio.

    Direction 0 sets the start of the other pilot directions; once all pilot directions are done their
    typical values start every later search - computed from the finished directions themselves, so a
    resumed run (or any batch size, or any rank) starts exactly the same searches.
    """

    def __init__(self, eps: float, initial_radius: float, pilot: int, below: "_CutoffTrack | None"):
        self.eps, self.initial_radius, self.pilot, self.below = eps, initial_radius, pilot, below
        self.start_radius, self.slope_hint, self.ratio = initial_radius, 2.0, math.nan
        self.mostly_unbounded = False
        self.reached: dict[int, bool] = {}  # whether the direction's ray met the cutoff inside the measure
        self.parts: list[DirectionRecords] = []
        self.radius: dict[int, float] = {}
        self.slope: dict[int, float] = {}
        self._stage = 0

    def done(self) -> "DirectionRecords":
        return DirectionRecords.concat(self.parts)

    def first_probes(self, indices: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """A direction's radius at the cutoff below times the pilot's typical ratio, else the typical radius;
        the measure's reach (inf, capped by the search) where most pilot directions never reached the cutoff."""
        n = indices.numel()
        if self.mostly_unbounded:
            return torch.full((n,), math.inf, dtype=torch.float64)
        if previous is None:
            return torch.full((n,), self.start_radius, dtype=torch.float64)
        if math.isnan(self.ratio):
            return torch.full((n,), math.nan, dtype=torch.float64)  # step from the earlier probes
        return torch.where(torch.isfinite(previous), previous * self.ratio, torch.full_like(previous, math.nan))

    def add(self, records: "DirectionRecords") -> None:
        self.parts.append(records)
        for i, r, s, status in zip(records.indices.tolist(), records.radii.tolist(), records.slopes.tolist(), records.status):
            self.radius[i], self.slope[i] = r, s
            self.reached[i] = status not in (UNBOUNDED, CLIPPED)
        if self._stage == 0 and 0 in self.radius:
            self.start_radius = typical_radius(torch.tensor([self.radius[0]]), self.initial_radius)
            self._stage = 1
        if self._stage == 1 and all(i in self.radius for i in range(self.pilot)):
            # Radii concentrate in high dimension, and so do the slope of log C at the cutoff and the ratio
            # of radii at two cutoffs: the pilot's typical values start every later search.
            radii = torch.tensor([self.radius[i] for i in range(self.pilot)], dtype=torch.float64)
            self.start_radius = typical_radius(radii, self.initial_radius)
            self.slope_hint = typical_slope(torch.tensor([self.slope[i] for i in range(self.pilot)]), 2.0)
            # A cutoff most rays never reach (a saturating cost): one probe at the reach settles those.
            self.mostly_unbounded = 2 * sum(self.reached[i] for i in range(self.pilot)) < self.pilot
            if self.below is not None:
                below = torch.tensor([self.below.radius[i] for i in range(self.pilot)], dtype=torch.float64)
                self.ratio = typical_radius(radii / below, math.nan)
            self._stage = 2


_RECORD_DTYPES = {
    "indices": torch.int64, "radii": torch.float64, "deltas": torch.float64, "n_evals": torch.int64,
    "nonmonotone": torch.bool, "slopes": torch.float64, "stats": torch.float64,
}


@dataclass
class DirectionRecords:
    """Finished directions (each field n rows): what a run keeps of each, in the order they finished.

    ``stats`` (n, 5) are the directions' ``DirectionStats``; the estimates are computed from them and
    the radii only when a result is assembled, over all directions at once, so that they never depend
    on how the directions were batched, sharded over processes or resumed.
    """

    indices: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    n_evals: torch.Tensor
    nonmonotone: torch.Tensor
    slopes: torch.Tensor
    stats: torch.Tensor
    status: list[str]

    @classmethod
    def of_search(cls, indices, stats: DirectionStats, outcome, measure_obj) -> "DirectionRecords":
        unbounded = torch.tensor([s == UNBOUNDED for s in outcome.status], dtype=torch.bool)
        radii, status = outcome.radii, list(outcome.status)
        if measure_obj.is_box:  # the ray ends at the box: the radius is its exit point
            status = [CLIPPED if s == UNBOUNDED else s for s in status]
        else:
            radii = torch.where(unbounded, torch.full_like(radii, math.inf), radii)
        columns = torch.stack([getattr(stats, f) for f in DirectionStats.__dataclass_fields__], dim=1)
        return cls(indices, radii, outcome.deltas, outcome.n_evals, outcome.nonmonotone, outcome.slopes, columns, status)

    def estimates(self, measure_obj, log_det_p: float) -> torch.Tensor:
        """Per direction: log ray measure - D log|P u| + log det P (nats)."""
        stats = DirectionStats.from_tensor(self.stats)
        return measure_obj.log_ray_measures(self.radii, stats) - measure_obj.dim * torch.log(stats.props) + log_det_p

    @classmethod
    def concat(cls, parts: list["DirectionRecords"]) -> "DirectionRecords":
        if not parts:
            empty = {f: torch.empty(0, dtype=d) for f, d in _RECORD_DTYPES.items()}
            empty["stats"] = torch.empty(0, 5, dtype=torch.float64)
            return cls(**empty, status=[])
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__ if f != "status"}
        return cls(**tensors, status=[s for p in parts for s in p.status])

    def by_index(self) -> "DirectionRecords":
        """The records sorted by direction index, each index once (pilot directions may come twice)."""
        order, seen = [], set()
        for k in sorted(range(self.indices.numel()), key=lambda k: int(self.indices[k])):
            if int(self.indices[k]) not in seen:
                seen.add(int(self.indices[k]))
                order.append(k)
        pick = torch.tensor(order, dtype=torch.int64)
        fields = {f: getattr(self, f)[pick] for f in self.__dataclass_fields__ if f != "status"}
        return DirectionRecords(**fields, status=[self.status[k] for k in order])


def _assemble(records: DirectionRecords, measure_obj, eps: float, log_det_p: float, seconds: float) -> VolumeResult:
    notes = [measure_obj.outside_reason] if getattr(measure_obj, "outside_reason", None) else []
    result = VolumeResult(
        estimates=records.estimates(measure_obj, log_det_p),
        radii=records.radii,
        deltas=records.deltas,
        props=DirectionStats.from_tensor(records.stats).props,
        status=records.status,
        n_evals=records.n_evals,
        indices=records.indices,
        nonmonotone=records.nonmonotone,
        dim=measure_obj.dim,
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

