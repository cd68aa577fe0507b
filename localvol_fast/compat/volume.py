"""tyche's ``volume.py``: the per-direction estimators, the radius search and ``aggregate``.

See ``localvol_fast.compat`` for what is the same as in tyche and what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from localvol_fast.compat.precondition import precondition_draw
from localvol_fast.core.checks import check_cutoff, check_integer, check_open_fraction
from localvol_fast.core.measures import DirectionStats, UniformMeasure, make_measure
from localvol_fast.core.radial import log_ball_volume, log_radial_integral, log_sphere_area
from localvol_fast.core.search import INTEGRATED_EXACTLY, UNBOUNDED, search_radii, status_counts_text
from localvol_fast.engine.pilot import typical_radius
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.ops.reference import stats_of_values

__all__ = [
    "VolumeResult",
    "aggregate",
    "find_radius_vectorized",
    "get_estimates_vectorized",
    "get_estimates_vectorized_gauss",
    "sample_directions",
]


# ----- results ---------------------------------------------------------------------------------------------
@dataclass
class VolumeResult:
    """Results of ``get_estimates_vectorized_gauss``, field for field as in tyche (all (n,) float64).

    estimates: log-probability estimate of each direction under N(0, sigma^2 I), importance-corrected
        (``aggregate(estimates)`` is the log-probability of the neighborhood).
    props: lengths of the preconditioned unit vectors (the proposal vectors).
    mults: radii in units of ``props`` (the radius along the unit direction is ``mults * props``);
        inf where the cost stays below the cutoff for as long as the Gaussian has mass.
    deltas: fn(center, m * vec) - fn(center, 0) at the accepted probe m of the search.
    gaussint: log integral_0^{mults*props} t^(D-1) exp(-a t^2/2 + b t + c) dt (see ``localvol_fast.compat``).
    status, n_evals: per direction, the search outcome (``localvol_fast.core.search.STATUS_NAMES``) and the
        number of evaluations of ``fn``. Not in tyche; optional, so the five-argument form still works.
    """

    estimates: torch.Tensor
    props: torch.Tensor
    mults: torch.Tensor
    deltas: torch.Tensor
    gaussint: torch.Tensor
    status: list[str] | None = field(default=None, repr=False)
    n_evals: torch.Tensor | None = field(default=None, repr=False)

    @property
    def radii(self) -> torch.Tensor:
        """Distance from the anchor along each unit direction to the boundary: ``mults * props``."""
        return self.mults * self.props

    @property
    def log_volume(self) -> float:
        """``aggregate(estimates)`` as a float: the log-probability of the neighborhood (nats)."""
        return float(aggregate(self.estimates))


def aggregate(estimates, dim: int = -1, keepdim: bool = False, return_sign: bool = False):
    """log(mean(exp(estimates))) along ``dim``, in float64 (tyche: a weighted logsumexp with weights 1/n).

    Returns a tensor (0-d for a 1-D input); with ``return_sign`` a pair (value, sign) where the sign is
    1, or 0 when every estimate is -inf (as tyche's ``weighted_logsumexp`` reports).
    """
    x = estimates.detach() if isinstance(estimates, torch.Tensor) else torch.as_tensor(estimates)
    x = x.to(torch.float64)
    if x.dim() == 0:
        x = x.reshape(1)
    count = x.shape[dim]
    if count == 0:
        raise ValueError("aggregate: there are no estimates to aggregate (empty along dim)")
    value = torch.logsumexp(x, dim=dim, keepdim=keepdim) - math.log(count)
    if return_sign:
        return value, torch.where(value == -math.inf, 0.0, 1.0).to(torch.float64)
    return value




# ----- the directions --------------------------------------------------------------------------------------
def _draw_batches(n: int, dim: int, batch_size: int, device, seed: int):
    """tyche's stream: manual_seed once, then randn(batch_size, D) per batch; yields (start, rows) pieces."""
    torch.manual_seed(seed)
    for start in range(0, n, batch_size):
        g = torch.randn(batch_size, dim, device=device)
        yield start, g[: min(batch_size, n - start)]


def sample_directions(
    n: int, dim: int, *, seed: int = 42, batch_size: int | None = None, preconditioner=None, device=None
) -> torch.Tensor:
    """The (n, D) float64 vectors ``get_estimates_vectorized_gauss`` perturbs along for these arguments.

    Not in tyche; for checking that a script sees the same directions (``get_estimates_vectorized`` uses
    ``batch_size=None``, one draw of all n). Resets torch's global seed, as the estimators do.
    """
    n = check_integer(n, "n")
    batch_size = n if batch_size is None else check_integer(batch_size, "batch_size")
    pieces = [precondition_draw(preconditioner, g)[0] for _, g in _draw_batches(n, dim, batch_size, device, seed)]
    return torch.cat(pieces)


# ----- the radius search -----------------------------------------------------------------------------------
def _cost_value(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        value = out.detach()
    else:
        value = torch.as_tensor(out, dtype=torch.float64)
    if value.numel() != 1:
        raise ValueError(f"fn(center, vec) must return a scalar, got shape {tuple(value.shape)}")
    return value.reshape(())


def baseline_cost(fn: Callable, center) -> float:
    """fn(center, 0), the cost at the anchor that every delta is measured from."""
    return float(_cost_value(fn(center, 0)).to("cpu", torch.float64))


def _search(center, rows_of, fn, cutoff, *, rtol, iters, initial, cap, perturbation_dtype, base):
    """search_radii over mults m, with C(m) = fn(center, m * vec_row) - fn(center, 0), row by row."""

    def evaluate(rows: torch.Tensor, mults: torch.Tensor) -> torch.Tensor:
        values = []
        for row, m in zip(rows.tolist(), mults.tolist()):
            vec = rows_of(row)
            values.append(_cost_value(fn(center, (m * vec.to(torch.float64)).to(perturbation_dtype))))
        if len({v.device for v in values}) == 1:  # one transfer to the host instead of one per direction
            stacked = torch.stack([v.to(torch.float64) for v in values]).cpu()
        else:
            stacked = torch.stack([v.to("cpu", torch.float64) for v in values])
        return stacked - base

    return search_radii(evaluate, initial, cap, cutoff, rtol=rtol, max_evals=iters + 1)


def _check_search_options(rtol, iters, init_mult, jump) -> tuple[float, int, float]:
    """tyche's search options, checked: (rtol, iters, init_mult); ``jump`` is only checked (unused)."""
    rtol = check_open_fraction(rtol, "rtol", "relative tolerance on |delta - cutoff| / cutoff")
    iters = check_integer(iters, "iters", minimum=0)
    if not (math.isfinite(float(init_mult)) and float(init_mult) > 0):
        raise ValueError(f"init_mult must be a positive number, got {init_mult!r}")
    if not float(jump) > 1:
        raise ValueError(f"jump must be > 1, got {jump!r}")
    return rtol, iters, float(init_mult)


# What an unbounded direction means for each estimator. tyche reports a finite number for these rays,
# so the uniform note says outright that the numbers returned are inf.
_GAUSSIAN_NOTES = {UNBOUNDED: INTEGRATED_EXACTLY}
_UNIFORM_NOTES = {UNBOUNDED: "never reached the cutoff: mults and estimates are inf, an infinite volume"}


def _warn_statuses(status: list[str], where: str, explanations: dict[str, str] | None = None) -> None:
    problems = status_counts_text(status, explanations)
    if problems:
        warnings.warn(
            f"{where}: of {len(status)} directions, {'; '.join(problems)} "
            "(see localvol_fast.core.search for the names)",
            RuntimeWarning,
            stacklevel=3,  # the caller of the public function
        )


def _rows_of_vecs(vecs) -> tuple[Callable[[int], torch.Tensor], int, torch.Tensor]:
    """``find_radius_vectorized``'s vecs as (row i -> (D,) tensor, row count, the tensor giving device and dtype)."""
    if isinstance(vecs, torch.Tensor):
        if vecs.dim() != 2:
            raise ValueError(f"vecs must be a (B, D) tensor or a sequence of (D,) tensors, got shape {tuple(vecs.shape)}")
        return (lambda i: vecs[i]), vecs.shape[0], vecs
    vecs = list(vecs)
    if not vecs or not all(isinstance(v, torch.Tensor) for v in vecs):
        raise TypeError("vecs must be a (B, D) tensor or a non-empty sequence of (D,) tensors")
    return (lambda i: vecs[i]), len(vecs), vecs[0]


def find_radius_vectorized(center, vecs, cutoff, fn, *, rtol=1e-1, init_mult=1, iters=10, jump=2.0):
    """The radius along each vector where fn reaches ``cutoff``, in units of that vector's length.

    center: the anchor (passed to ``fn`` untouched). vecs: a (B, D) tensor or a sequence of (D,) tensors.
    fn(center, vec) -> scalar cost at center + vec; it is also called once as fn(center, 0).
    Returns ``(mults, deltas)``, (B,) float64 tensors on the device of ``vecs``: the radius is
    ``mults * |vec|``, and deltas = fn(center, m * vec) - fn(center, 0) at the accepted probe m, with
    |deltas - cutoff| <= rtol * cutoff for every converged direction (as in tyche).

    Differences from tyche: ``mults`` is moved from the accepted probe along the local log-log slope so
    that the cost equals ``cutoff`` (tyche returns its next bisection midpoint instead); at most
    iters + 1 evaluations per vector; ``jump`` is unused (the search extrapolates along the measured
    slope); directions that do not converge keep the best bracketed estimate and raise a RuntimeWarning.
    """
    eps = check_cutoff(cutoff)
    rtol, iters, init_mult = _check_search_options(rtol, iters, init_mult, jump)
    rows_of, count, first = _rows_of_vecs(vecs)
    device = first.device
    if count == 0:
        empty = torch.empty(0, dtype=torch.float64, device=device)
        return empty, empty.clone()
    outcome = _search(
        center,
        rows_of,
        fn,
        eps,
        rtol=rtol,
        iters=iters,
        initial=torch.full((count,), init_mult, dtype=torch.float64),
        cap=torch.full((count,), math.inf, dtype=torch.float64),
        perturbation_dtype=first.dtype if first.is_floating_point() else torch.float64,
        base=baseline_cost(fn, center),
    )
    _warn_statuses(outcome.status, "find_radius_vectorized")
    return outcome.radii.to(device), outcome.deltas.to(device)


# ----- the estimators --------------------------------------------------------------------------------------
@dataclass
class DirectionEstimates:
    """What ``estimate_along`` finds for a batch of directions (each (B,), float64 on the CPU)."""

    estimates: torch.Tensor
    props: torch.Tensor
    mults: torch.Tensor
    deltas: torch.Tensor
    gaussint: torch.Tensor | None  # None for the uniform measure
    status: list[str]
    n_evals: torch.Tensor


def _resolve_fn(fn, unary_fn) -> Callable:
    if fn is None:
        if unary_fn is None:
            raise ValueError("fn or unary_fn must be provided")
        if not callable(unary_fn):
            raise TypeError(f"unary_fn must be callable, got {type(unary_fn).__name__}")
        return lambda a, b: unary_fn(a + b)
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(center, vec), got {type(fn).__name__}")
    return fn


def _check_params(params) -> torch.Tensor:
    if not isinstance(params, torch.Tensor):
        raise TypeError(
            f"params must be the flat (D,) parameter tensor, got {type(params).__name__}; tyche's implicit "
            "vectors are not supported here (localvol_fast.estimate_volume handles very large models)"
        )
    if params.dim() != 1 or params.numel() == 0 or not params.is_floating_point():
        raise ValueError(
            f"params must be a non-empty 1-D floating tensor (e.g. parameters_to_vector(model.parameters())), "
            f"got {params.dtype} of shape {tuple(params.shape)}"
        )
    if not bool(torch.isfinite(params.detach()).all()):
        raise ValueError("params holds NaN or inf values; the volume around a non-finite network is undefined")
    return params


def _direction_stats(w: torch.Tensor, center: torch.Tensor, weights: torch.Tensor | None) -> DirectionStats:
    """DirectionStats of the vectors w (B, D) float64, on the CPU.

    w are already preconditioned unit vectors and their props are |w|, so sq_norm_g (the |g|^2 that
    props divides by) is 1 rather than |w|^2.
    """
    nu = None if weights is None else weights.to(w.device)
    values = stats_of_values(w, center.detach().to(w.device), None, nu).to("cpu", torch.float64)
    stats = DirectionStats.from_tensor(values)
    return dataclasses.replace(stats, sq_norm_g=torch.ones(w.shape[0], dtype=torch.float64))


class GaussianTerms:
    """tyche's split of the Gaussian estimate: gaussint (with the anchor term c) and the constant rest."""

    def __init__(self, center: torch.Tensor, sigma):
        self.measure = make_measure("gaussian", center.detach(), sigma=sigma)
        self.c = self.measure.anchor_log_density_term
        self.log_const = log_sphere_area(self.measure.dim) + self.measure.log_normalizer


def _log_estimates(stats, mults, log_det: float, gaussian: GaussianTerms | None, dim: int):
    """(estimates, gaussint) for radii ``mults * props``; gaussint is None for the uniform measure."""
    if gaussian is None:
        return log_ball_volume(dim) + dim * torch.log(mults) + log_det, None
    props = stats.props
    a, b = gaussian.measure.radial_coefficients(stats)
    gaussint = log_radial_integral(float(dim - 1), a, b, mults * props) + gaussian.c
    return gaussint + gaussian.log_const - dim * torch.log(props) + log_det, gaussint


def estimate_along(
    w: torch.Tensor,
    log_det: float,
    *,
    center: torch.Tensor,
    fn: Callable,
    base: float,
    gaussian: GaussianTerms | None,
    cutoff: float,
    rtol: float,
    iters: int,
    initial: float,
) -> DirectionEstimates:
    """Search and estimate along the given vectors w (B, D) float64 (unit vectors, preconditioned).

    gaussian: the Gaussian measure's terms, or None for the uniform measure (Lebesgue volume).
    """
    weights = gaussian.measure.weights if gaussian is not None else None
    stats = _direction_stats(w, center, weights)
    measure = gaussian.measure if gaussian is not None else UniformMeasure(center.detach())
    outcome = _search(
        center,
        lambda i: w[i],
        fn,
        cutoff,
        rtol=rtol,
        iters=iters,
        initial=torch.full((w.shape[0],), float(initial), dtype=torch.float64),
        cap=measure.radius_cap(stats) / stats.props,
        perturbation_dtype=center.dtype,
        base=base,
    )
    # The search stops unbounded rays at the measure's reach; for tyche's fields they run to infinity.
    unbounded = torch.tensor([s == UNBOUNDED for s in outcome.status], dtype=torch.bool)
    mults = torch.where(unbounded, torch.full_like(outcome.radii, math.inf), outcome.radii)
    estimates, gaussint = _log_estimates(stats, mults, log_det, gaussian, center.numel())
    return DirectionEstimates(
        estimates, stats.props, mults, outcome.deltas, gaussint, outcome.status, outcome.n_evals
    )


def get_estimates_vectorized_gauss(
    n,
    sigma,
    *,
    batch_size=None,
    preconditioner=None,
    fn=None,
    unary_fn=None,
    params,
    seed=42,
    with_tqdm=True,
    cutoff=1e-3,
    rtol=1e-2,
    iters=100,
    init_mult=1,
    jump=2.0,
    tol=1e-2,
    y_tol=5,
    gaussint_fn=None,
    debug=False,
) -> VolumeResult:
    """Per-direction estimates of the log-probability that N(0, sigma^2 I) lands in {fn(params, .) - fn(params, 0) <= cutoff}.

    n: number of directions; batch_size: directions drawn and searched together (default n);
    sigma: scalar (or a (D,) tensor, or None for the RMS of ``params``); preconditioner: see
    ``localvol_fast.compat.precondition`` (typically ``diag_preconditioner(adam_exp_avg_sq, eps=1e-5)``);
    fn(center, vec) or unary_fn(theta); params: the flat (D,) anchor; seed: ``torch.manual_seed`` before the first draw.
    cutoff, rtol, iters, init_mult, jump: the radius search (see ``find_radius_vectorized``).
    tol, y_tol, gaussint_fn: accepted for compatibility and ignored (the integral here is exact).
    Returns ``VolumeResult(estimates, props, mults, deltas, gaussint)``; ``aggregate(result.estimates)``
    is the log-probability. See the docstring of localvol_fast.compat for what differs from tyche.
    """
    del tol, y_tol, gaussint_fn  # tyche's approximate integral needed them; log_radial_integral does not
    center = _check_params(params)
    fn = _resolve_fn(fn, unary_fn)
    n = check_integer(n, "n")
    batch_size = n if batch_size is None else check_integer(batch_size, "batch_size")
    eps = check_cutoff(cutoff)
    rtol, iters, init_mult = _check_search_options(rtol, iters, init_mult, jump)
    gaussian = GaussianTerms(center, sigma)
    along = functools.partial(
        estimate_along, center=center, fn=fn, base=baseline_cost(fn, center), gaussian=gaussian, cutoff=eps,
        rtol=rtol, iters=iters,
    )
    draws = _draw_batches(n, center.numel(), batch_size, center.device, seed)
    batches = _estimate_batches(draws, preconditioner, along, init_mult, bool(with_tqdm), debug, n)
    status = [s for b in batches for s in b.status]
    _warn_statuses(status, "get_estimates_vectorized_gauss", _GAUSSIAN_NOTES)
    cat = lambda name: torch.cat([getattr(b, name) for b in batches]).to(center.device)  # noqa: E731
    return VolumeResult(
        estimates=cat("estimates"),
        props=cat("props"),
        mults=cat("mults"),
        deltas=cat("deltas"),
        gaussint=cat("gaussint"),
        status=status,
        n_evals=cat("n_evals"),
    )


def _estimate_batches(draws, preconditioner, along: Callable, init_mult: float, progress: bool, debug: bool, n: int):
    """``along`` each drawn batch in turn; later batches start their search at the typical radius so far."""
    batches: list[DirectionEstimates] = []
    bar = ProgressBar(n, enabled=progress)
    start_mult = init_mult
    for start, g in draws:
        w, log_det = precondition_draw(preconditioner, g)
        batch = along(w, log_det, initial=start_mult)
        del w  # a (B, D) float64 copy: free it before the next draw
        batches.append(batch)
        start_mult = typical_radius(torch.cat([b.mults for b in batches]), start_mult)
        bar.update(g.shape[0], evals=float(batch.n_evals.double().mean()))
        if debug:
            print(_debug_line(start, g.shape[0], batch, log_det))
    bar.close()
    return batches


def _debug_line(start: int, count: int, batch: DirectionEstimates, log_det: float) -> str:
    return (
        f"[compat] directions {start}..{start + count - 1}: evals/direction "
        f"{float(batch.n_evals.double().mean()):.3g}, status {dict(Counter(batch.status))}, "
        f"estimates [{float(batch.estimates.min()):.6g}, {float(batch.estimates.max()):.6g}], "
        f"log det P {log_det:.3g}"
    )


def get_estimates_vectorized(
    n,
    preconditioner=None,
    *,
    fn=None,
    params,
    unary_fn=None,
    seed=42,
    cutoff=1e-3,
    rtol=1e-2,
    iters=100,
    init_mult=1,
    jump=2.0,
):
    """Per-direction estimates of the log Lebesgue volume of {fn(params, .) - fn(params, 0) <= cutoff}.

    As in tyche: all n directions drawn at once (``torch.manual_seed(seed); torch.randn(n, D)``), unit,
    then preconditioned (a (D, D) matrix P applied as ``vecs @ P.T``, or any preconditioner accepted by
    ``get_estimates_vectorized_gauss``). Returns the tuple ``(estimates, props, mults, deltas)`` with
    estimates = log V_D + D log(mults) (+ log|det P| for tensor and ``diag_preconditioner`` P), i.e.
    log V_D + D log(radius) - D log(props). A direction that never reaches the cutoff has mults = inf and
    estimate inf (infinite volume), with a RuntimeWarning.
    """
    center = _check_params(params)
    fn = _resolve_fn(fn, unary_fn)
    n = check_integer(n, "n")
    eps = check_cutoff(cutoff)
    rtol, iters, init_mult = _check_search_options(rtol, iters, init_mult, jump)
    base = baseline_cost(fn, center)
    ((_, g),) = _draw_batches(n, center.numel(), n, center.device, seed)
    w, log_det = precondition_draw(preconditioner, g)
    batch = estimate_along(
        w, log_det, center=center, fn=fn, base=base, gaussian=None, cutoff=eps, rtol=rtol, iters=iters,
        initial=init_mult,
    )
    _warn_statuses(batch.status, "get_estimates_vectorized", _UNIFORM_NOTES)
    to = lambda t: t.to(center.device)  # noqa: E731
    return to(batch.estimates), to(batch.props), to(batch.mults), to(batch.deltas)
