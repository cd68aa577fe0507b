"""``estimate_volume``: the local volume of a cost function around an anchor.

For each direction index i (the stream g(seed, i) of ``core.philox``), the unit direction is
w_hat = P g / |P g|, its radius r solves C(theta0 + r w_hat) = eps (``core.search``), and its estimate
is ``measure.log_ray_measures(r) - D log|w| + log det P`` (``core.measures``). The volume is the
log-mean-exp. This module only orchestrates: the pieces live in ``directions``, ``pilot``,
``records``, ``journal``, ``distributed`` and ``progress``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from localvol_fast.core.checks import check_anchor, check_diagonal_size
from localvol_fast.core.measures import make_measure
from localvol_fast.core.preconditioners import MatrixPreconditioner, log_det, normalize_preconditioner
from localvol_fast.core.result import VolumeResult, log_mean_exp
from localvol_fast.core.search import search_radii
from localvol_fast.engine.directions import DenseDirectionBatch, DirectionBatch
from localvol_fast.engine.distributed import gather, owns, process_group
from localvol_fast.engine.evaluation import as_evaluator
from localvol_fast.engine.journal import open_journal, tensor_checksum, tensor_fingerprint
from localvol_fast.engine.options import RunOptions
from localvol_fast.engine.pilot import PILOT_DIRECTIONS, CutoffTrack, direction_batches
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.engine.records import DirectionRecords, assemble_result
from localvol_fast.ops import Backend, get_backend

_DEFAULT_BATCH_ELEMENTS = 1 << 24  # batch_size=None keeps B * D near this many parameters
# |C(anchor)| must stay below this fraction of the cutoff: more is a wrong cost, or rounding noise
# (float32 KL is ~1e-9 at the anchor) too large to resolve the cutoff within rtol.
ANCHOR_COST_TOLERANCE = 0.05


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
    preconditioner: None (isotropic), a positive (D,) diagonal, e.g. ``adam_preconditioner(...)``, or a
        dense ``MatrixPreconditioner`` such as ``Eigenbasis(Q, scales)`` (P = Q diag(scales), D <= 16,384).
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
    evaluator = as_evaluator(fn)
    flat = check_anchor(anchor)
    options = RunOptions.checked(
        cutoff=cutoff, n_samples=n_samples, seed=seed, rtol=rtol, batch_size=batch_size, max_evals=max_evals,
        initial_radius=initial_radius, progress=progress, output=output, resume=resume, distributed=distributed,
    )
    return run_estimate(
        evaluator, flat, options, measure=measure, sigma=sigma, bounds=bounds, preconditioner=preconditioner,
        backend=backend, run_info=run_info,
    )


def run_estimate(
    evaluator, anchor: torch.Tensor, options: RunOptions, *, measure="gaussian", sigma=None, bounds=None,
    preconditioner=None, backend: str | Backend = "auto", run_info: dict | None = None,
):
    """``estimate_volume`` for an evaluator, a checked flat anchor and checked options (where the
    ``nn`` layer enters the engine); ``backend`` may be a resolved ``Backend``."""
    measure_obj = make_measure(measure, anchor, sigma=sigma, bounds=bounds)
    precond = _preconditioner_on(preconditioner, anchor)
    ops = backend if isinstance(backend, Backend) else get_backend(backend, anchor.device)
    _check_anchor_cost(evaluator, anchor, options.smallest_cutoff)

    started = time.perf_counter()
    rank, world_size = process_group(options.distributed)
    tracks = _cutoff_tracks(options)
    journal = None
    if options.output is not None:
        config = _journal_config(options, anchor, measure_obj, precond, ops, run_info)
        journal = open_journal(options.output, config, options.resume, rank, world_size)
        _take_finished(journal, tracks, options)
    done = journal.done_indices(options.cutoffs, options.n_samples) if journal is not None else set()
    todo = [i for i in range(options.n_samples) if i not in done and owns(i, rank, world_size, PILOT_DIRECTIONS)]
    new_parts, totals = _run_directions(evaluator, anchor, todo, tracks, measure_obj, precond, ops, options, journal, rank)

    info = {"seconds": time.perf_counter() - started, "processes": world_size, **totals}
    if len(options.cutoffs) > 1:
        info["cutoffs_searched_together"] = list(options.cutoffs)
    config = {"seed": options.seed, "rtol": options.rtol, "preconditioned": precond is not None, "backend": ops.name}
    by_cutoff = {t.eps: t for t in tracks}
    results = []
    for eps in options.cutoffs:
        records = _everyones_records(by_cutoff[eps].done(), new_parts[eps], world_size)
        result = assemble_result(records.by_index(), measure_obj, eps, log_det(precond), dict(info))
        result.config.update(config)
        results.append(result)
    return results if options.returns_list else results[0]


def _preconditioner_on(preconditioner, anchor: torch.Tensor):
    """P normalized to det P = 1 on the anchor's device (None: isotropic): a (D,) diagonal tensor, or a
    ``MatrixPreconditioner`` for the dense batches."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, MatrixPreconditioner):
        preconditioner.check_dim(anchor.numel())
        return preconditioner.normalized().to(anchor.device)
    check_diagonal_size(preconditioner, anchor.numel())
    return normalize_preconditioner(preconditioner).to(anchor.device)


def _check_anchor_cost(evaluator, anchor: torch.Tensor, eps: float) -> None:
    anchor_cost = evaluator.anchor_cost(anchor)
    if not (math.isfinite(anchor_cost) and abs(anchor_cost) <= ANCHOR_COST_TOLERANCE * eps):
        raise ValueError(
            f"fn(anchor) = {anchor_cost!r}, but the cost must be 0 at the anchor (e.g. L(theta) - L(theta0) "
            f"or KL(anchor || theta)), at least below {ANCHOR_COST_TOLERANCE:g} x the cutoff {eps!r}. If the "
            "cost is right, this is its rounding noise: evaluate it in higher precision or use a larger cutoff"
        )


def _cutoff_tracks(options: RunOptions) -> list[CutoffTrack]:
    """One track per distinct cutoff, smallest first: each search starts from the probes of the one before."""
    tracks: list[CutoffTrack] = []
    for eps in options.sorted_cutoffs:
        tracks.append(CutoffTrack(eps, options.initial_radius, PILOT_DIRECTIONS, tracks[-1] if tracks else None))
    return tracks


def _journal_config(options: RunOptions, anchor, measure_obj, precond, ops, run_info) -> dict:
    """Everything a resumed run must match: every element of the anchor, the preconditioner and the
    measure's per-parameter vectors by checksum (a strided sample would miss most of them)."""
    vectors = {"weights": measure_obj.weights, "bounds": measure_obj.bounds}
    vectors = {k: None if v is None else tensor_checksum(v) for k, v in vectors.items()}
    return {
        "seed": options.seed, "cutoffs": options.sorted_cutoffs, "measure": {**measure_obj.describe(), **vectors},
        "rtol": options.rtol, "max_evals": options.max_evals, "initial_radius": options.initial_radius,
        "backend": ops.name, "anchor": tensor_fingerprint(anchor),
        "preconditioner": _preconditioner_fingerprint(precond),
        **(run_info or {}),
    }


def _preconditioner_fingerprint(precond):
    if precond is None:
        return None
    if isinstance(precond, torch.Tensor):
        return tensor_fingerprint(precond)
    parts = precond.fingerprint_parts()
    return {k: tensor_fingerprint(v) if isinstance(v, torch.Tensor) else v for k, v in parts.items()}


def _take_finished(journal, tracks: list[CutoffTrack], options: RunOptions) -> None:
    """Directions finished by an earlier run count as done (and set the pilot's figures); of a run
    resumed with fewer ``n_samples``, only the first ``n_samples``, as an uninterrupted run gives."""
    done = journal.done_indices(options.cutoffs, options.n_samples)
    if done:
        for track in tracks:
            track.add(DirectionRecords.from_rows(journal.records(track.eps, sorted(done))))


def _run_directions(evaluator, anchor, todo, tracks, measure_obj, precond, ops, options, journal, rank):
    """Search every direction of ``todo`` batch by batch, at every cutoff; journal each finished batch.

    Returns this process's new records per cutoff and its totals (search rounds, seconds evaluating).
    """
    batch_size = options.batch_size or max(1, min(options.n_samples, 256, _DEFAULT_BATCH_ELEMENTS // anchor.numel()))
    to_device = lambda t: None if t is None else t.to(anchor.device)  # noqa: E731
    weights, bounds_vector = to_device(measure_obj.weights), to_device(measure_obj.bounds)
    log_det_p = log_det(precond)
    batch_type = DenseDirectionBatch if isinstance(precond, MatrixPreconditioner) else DirectionBatch
    bar = ProgressBar(len(todo), enabled=options.progress and rank == 0)
    new_parts = {t.eps: [] for t in tracks}
    totals = {"search_rounds": 0, "seconds_evaluating": 0.0}
    for indices in direction_batches(todo, batch_size, PILOT_DIRECTIONS):
        batch = batch_type(ops, options.seed, indices, anchor, precond, weights, bounds_vector)
        evaluator.start_batch(batch)
        evals = _search_batch(evaluator, batch, indices, tracks, measure_obj, options, new_parts, totals)
        if journal is not None:  # a batch is journaled only once every cutoff is done
            for track in tracks:
                finished = new_parts[track.eps][-1]
                journal.append(track.eps, finished, finished.estimates(measure_obj, log_det_p))
        running = log_mean_exp(tracks[0].done().estimates(measure_obj, log_det_p)) if options.progress else math.nan
        bar.update(indices.numel(), evals=evals, log_volume=running)
    bar.close()
    return new_parts, totals


def _search_batch(evaluator, batch, indices, tracks, measure_obj, options, new_parts, totals) -> float:
    """Search one batch at each cutoff in turn, each from the probes of the one before; returns the
    evaluations per direction it took."""
    cap, history, evals, previous = measure_obj.radius_cap(batch.stats), [], 0.0, None
    for track in tracks:
        outcome = search_radii(
            evaluator,
            track.first_probes(indices, previous),
            cap,
            track.eps,
            rtol=options.rtol,
            max_evals=options.max_evals,
            slope_hint=track.slope_hint,
            history=history,
        )
        history, previous = outcome.history, outcome.radii
        totals["search_rounds"] += outcome.rounds
        totals["seconds_evaluating"] += outcome.seconds_evaluating
        evals += float(outcome.n_evals.double().mean())
        records = DirectionRecords.of_search(indices, batch.stats, outcome, measure_obj)
        track.add(records)
        new_parts[track.eps].append(records)
    return evals


def _everyones_records(records: DirectionRecords, new_parts: list, world_size: int) -> DirectionRecords:
    """With several processes, every rank's new directions, on every rank."""
    if world_size == 1:
        return records
    rows = gather(DirectionRecords.concat(new_parts).to_rows() if new_parts else [], world_size)
    return DirectionRecords.concat([records, DirectionRecords.from_rows(rows)] if rows else [records])
