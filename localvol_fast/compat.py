"""Drop-in names for scripts written against ``tyche``, the package of EleutherAI's basin-volume repository.

Switching a script
------------------
    import tyche                                        ->  from localvol_fast import compat as tyche
    from tyche.volume import get_estimates_vectorized_gauss, aggregate, VolumeResult
                                                        ->  from localvol_fast.compat import ...  (same names)
    from tyche.precondition import diag_preconditioner  ->  from localvol_fast.compat import diag_preconditioner

This follows ``src/tyche/volume.py`` and ``src/tyche/precondition.py`` of EleutherAI/basin-volume. (The later
EleutherAI/tyche repository changed ``fn`` to ``fn(center, vec, mult)`` with vector-valued costs; that
convention is not supported here.)

Calls keep their arguments and results: ``get_estimates_vectorized_gauss(n, sigma, *, params=..., fn=...)``
returns a ``VolumeResult(estimates, props, mults, deltas, gaussint)``, ``get_estimates_vectorized`` the
tuple ``(estimates, props, mults, deltas)``, ``find_radius_vectorized`` the pair ``(mults, deltas)`` and
``aggregate(estimates)`` the log of the mean of exp(estimates).

What is the same as in tyche
----------------------------
- The conventions: ``params`` is the flat (D,) parameter vector (the anchor, "center"); ``fn(center, vec)``
  returns the scalar cost at ``center + vec`` and is also called as ``fn(center, 0)`` for the baseline;
  ``unary_fn(theta)`` may be given instead (then ``fn = lambda a, b: unary_fn(a + b)``).
- The directions: ``torch.manual_seed(seed)`` once, then per batch ``torch.randn(batch_size, D,
  device=params.device)`` (all ``n`` at once in ``get_estimates_vectorized``); each row is scaled to unit
  length and then preconditioned. The same seed therefore perturbs along the same directions as tyche.
- The meaning of every field: ``estimates`` the per-direction log estimate of the probability (Gaussian)
  or volume (uniform), importance-corrected by ``- D log props``; ``props`` the length of each
  preconditioned unit vector; ``mults`` the radius in units of that length (radius = mults * props);
  ``deltas`` = fn(center, mults * vec) - fn(center, 0) as measured by the search; ``gaussint`` =
  log integral_0^{mults*props} t^(D-1) exp(-a t^2/2 + b t + c) dt with a = 1/sigma^2,
  b = -(vec . params) / (sigma^2 props), c = -|params|^2 / (2 sigma^2), so that
  estimates = gaussint + log V_D + log D - (D/2) log(2 pi sigma^2) - D log props.
- ``diag_preconditioner(spec, eps, exponent)``: p = 1 / (|spec|^exponent + eps), rescaled to mean(log p) = 0,
  returned as a callable x -> x * p on a (B, D) batch (or a (D,) vector).

What differs (on purpose)
-------------------------
- ``gaussint`` is computed by ``localvol_fast.radial.log_radial_integral``: exact to ~1e-13 in float64 for any
  D, radius (including infinity) and offset. It never raises "Approximation error too high" or
  "catastrophic cancellation"; ``tol``, ``y_tol`` and ``gaussint_fn`` are accepted and ignored.
- The radius search is ``localvol_fast.search.search_radii`` (log-log secant with brackets) instead of
  doubling and bisection. It accepts a probe under the same criterion, |delta - cutoff| <= rtol * cutoff,
  then moves ``mults`` along the measured local log-log slope so that the cost hits ``cutoff`` (exactly for
  power-law costs); ``deltas`` is the cost at the accepted probe. tyche instead returns the *next* probe
  of its bisection (its loop updates ``mults`` after measuring ``deltas``), which can lie anywhere in the
  last bracket, and a factor ``jump`` too far when the first probe is already accepted from below.
  ``jump`` is accepted and unused; ``init_mult`` is the first probe (of the first batch: later batches
  start from the typical radius found so far); ``iters`` caps the evaluations per direction at iters + 1.
  Evaluation counts are typically 3-8 per direction instead of 10-15.
- Directions whose cost never reaches the cutoff: with the Gaussian measure the search stops where the
  measure has no mass left and the integral runs to infinity (``mults`` = inf, exact); with the uniform
  measure ``mults`` and the estimate are inf (infinite volume). tyche doubles until ``iters`` runs out and
  reports a finite number. Directions that do not converge are reported by a RuntimeWarning, not silently.
- Arithmetic after the float32 draw is float64: the unit vectors, the preconditioning (for
  ``diag_preconditioner``, tensors and None), ``props``, ``mults``, ``deltas``, ``gaussint``, ``estimates``.
  All returned tensors are float64 on ``params.device`` (tyche: float32). This matters: an error d in
  log(props) moves an estimate by D * d nats, and tyche's float32 norms and mean(log p) leave errors of
  that kind of order D * 1e-7. The vectors passed to ``fn`` are ``mults * vec`` formed in float64 and cast
  to the dtype of ``params`` (``find_radius_vectorized``: of ``vecs``).
- When ``batch_size`` does not divide ``n``, the last batch is drawn at full size (so the random stream is
  tyche's) but only ``n`` directions are searched and returned; tyche returns ceil(n / batch_size) *
  batch_size of them.
- ``preconditioner`` may be a callable (as tyche's ``get_estimates_vectorized_gauss`` expects), the
  result of ``diag_preconditioner``, a (D,) tensor (a diagonal) or a (D, D) matrix P applied as
  ``vecs @ P.T`` (as tyche's ``get_estimates_vectorized`` expects), in both functions. For tensors and
  ``diag_preconditioner`` the exact log|det P| is added to the estimates (0 up to rounding for a
  normalized one; tyche assumes det P = 1). Other callables are assumed to have det P = 1, as in tyche.
- ``sigma`` may also be None (the RMS of ``params``, as tyche's ``VolumeEstimator.run`` does) or a (D,)
  tensor of per-parameter scales; then a = sum_i w_i^2 / sigma_i^2 / |w|^2 etc. generalize the above.
- ``aggregate`` divides by the size along ``dim`` (tyche divides by ``len(estimates)``, the size of the
  first axis, which differs for multi-dimensional input) and works in float64.
- ``params`` must be a concrete 1-D tensor: tyche's ``ImplicitVector`` mode is not supported (use
  ``localvol_fast.estimate_volume``, whose directions never need a (B, D) copy, for very large models).
- If ``fn`` itself draws from torch's global generator, the directions of later batches depend on how many
  times it was called, which differs from tyche (fewer evaluations); they match when ``fn`` is deterministic.

The estimator classes (``src/tyche/estimator.py``)
--------------------------------------------------
    from tyche.estimator import VolumeConfig, VolumeEstimator
                                                        ->  from localvol_fast.compat import VolumeConfig, VolumeEstimator
``VolumeConfig`` has tyche's fields and defaults (plus ``optimizer``, ``fisher_passes`` and ``rtol``), and
``VolumeEstimator.from_config(cfg).run()`` returns the ``VolumeResult`` above, for a Hugging Face causal LM
(``model_type="causal"``) on the device the model is on. The run is ``localvol_fast.estimate`` on the
tokenized data, so its directions are localvol_fast's (not tyche's ``torch.randn`` stream);
``run(native=True)`` returns the ``localvol_fast.VolumeResult``. ``VolumeEstimator``'s docstring lists the
field mapping, what is ignored (tol, y_tol, cache_mode, implicit_vectors, block_size) and what differs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .measures import DirectionStats, UniformMeasure, make_measure
from .models import estimate, select_parameters, selected_optimizer_state
from .preconditioners import adam_preconditioner, normalize_preconditioner
from .progress import ProgressBar
from .radial import log_ball_volume, log_radial_integral, log_sphere_area
from .search import CONVERGED, UNBOUNDED, search_radii
from .volume import check_cutoff, typical_radius

__all__ = [
    "CausalLMEstimator",
    "DiagPreconditioner",
    "VolumeConfig",
    "VolumeEstimator",
    "VolumeResult",
    "aggregate",
    "diag_preconditioner",
    "find_radius_vectorized",
    "get_estimates_vectorized",
    "get_estimates_vectorized_gauss",
    "sample_directions",
]

_LOG_2PI = math.log(2.0 * math.pi)


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
    gaussint: log integral_0^{mults*props} t^(D-1) exp(-a t^2/2 + b t + c) dt (see the module docstring).
    status, n_evals: per direction, the search outcome (``localvol_fast.search.STATUS_NAMES``) and the
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


# ----- preconditioners -------------------------------------------------------------------------------------
class DiagPreconditioner:
    """The callable x -> x * p returned by ``diag_preconditioner`` (p a (D,) float64 tensor, mean log p = 0).

    Applied to a (..., D) tensor it returns a tensor of the same dtype (float64 inside), like tyche's
    lambda. The estimators recognize it and use ``p`` in float64 directly, adding ``log_det``.
    """

    def __init__(self, p: torch.Tensor):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.shape[-1:] != self.p.shape:
            raise ValueError(
                f"the preconditioner has {self.p.numel()} entries but the vectors have shape {tuple(x.shape)}; "
                "pass a (D,) vector or a (B, D) batch"
            )
        out = x.to(torch.float64) * self.p.to(x.device)
        return out.to(x.dtype) if x.is_floating_point() else out

    @property
    def log_det(self) -> float:
        """log det P = sum log p (0 up to rounding)."""
        return float(torch.log(self.p).sum())

    def __repr__(self) -> str:
        return f"DiagPreconditioner(D={self.p.numel()}, log_det={self.log_det:.3g})"


def diag_preconditioner(spec, eps: float = 1e-3, exponent: float = 0.5) -> DiagPreconditioner:
    """Diagonal preconditioner p = 1 / (|spec|^exponent + eps), rescaled so that mean(log p) = 0 (det P = 1).

    spec: (D,) curvature estimate, e.g. Adam's ``exp_avg_sq`` (the paper: exponent 0.5, eps 1e-5).
    Returns a callable applying x -> x * p to a (B, D) batch (or a (D,) vector), as tyche's does; p is
    computed in float64 (``.p``), so det P = 1 to rounding even for D in the billions.
    """
    spec = torch.as_tensor(spec).detach().reshape(-1).to(torch.float64)
    if not (math.isfinite(float(exponent)) and float(exponent) > 0):
        raise ValueError(f"exponent must be a positive number, got {exponent!r}")
    if not float(eps) >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not bool(torch.isfinite(spec).all()):
        raise ValueError("spec holds NaN or inf values; the curvature estimate is corrupted")
    raw = 1.0 / (spec.abs() ** float(exponent) + float(eps))
    return DiagPreconditioner(normalize_preconditioner(raw, name="diag_preconditioner (1 / (|spec|^exponent + eps))"))


def _precondition(preconditioner, g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Unit rows of the draw ``g`` (B, D), preconditioned: (w float64 (B, D), log|det P|)."""
    dim = g.shape[1]
    g64 = g.to(torch.float64)
    u = g64 / torch.linalg.vector_norm(g64, dim=1, keepdim=True)
    if preconditioner is None:
        return u, 0.0
    if isinstance(preconditioner, DiagPreconditioner):
        if preconditioner.p.numel() != dim:
            raise ValueError(f"the preconditioner has {preconditioner.p.numel()} entries but params has {dim}")
        return u * preconditioner.p.to(u.device), preconditioner.log_det
    if isinstance(preconditioner, torch.Tensor):
        P = preconditioner.detach().to(device=u.device, dtype=torch.float64)
        if P.dim() == 1 and P.numel() == dim:
            if not bool((torch.isfinite(P) & (P != 0)).all()):
                raise ValueError("a diagonal preconditioner must be finite and nonzero everywhere")
            return u * P, float(torch.log(P.abs()).sum())
        if P.dim() == 2 and tuple(P.shape) == (dim, dim):
            sign, logabsdet = torch.linalg.slogdet(P)
            if float(sign) == 0:
                raise ValueError("the preconditioner matrix is singular")
            return u @ P.T, float(logabsdet)
        raise ValueError(
            f"a tensor preconditioner must be a (D,) diagonal or a (D, D) matrix with D = {dim}, "
            f"got shape {tuple(P.shape)}"
        )
    if callable(preconditioner):
        # tyche's exact operations: float32 unit rows, then the callable; det P is assumed to be 1.
        out = preconditioner(g / torch.norm(g, dim=1, keepdim=True))
        w = torch.as_tensor(out).to(device=g.device, dtype=torch.float64)
        if tuple(w.shape) != tuple(g.shape):
            raise ValueError(f"the preconditioner returned shape {tuple(w.shape)} for a batch of shape {tuple(g.shape)}")
        return w, 0.0
    raise TypeError(
        "preconditioner must be None, a callable on a (B, D) batch (e.g. diag_preconditioner(...)), "
        f"a (D,) tensor or a (D, D) matrix; got {type(preconditioner).__name__}"
    )


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
    _check_count(n, "n")
    batch_size = n if batch_size is None else _check_count(batch_size, "batch_size")
    pieces = [_precondition(preconditioner, g)[0] for _, g in _draw_batches(n, dim, batch_size, device, seed)]
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


def _search(center, rows_of, fn, cutoff, *, rtol, iters, initial, cap, perturbation_dtype, base=None):
    """search_radii over mults m, with C(m) = fn(center, m * vec_row) - fn(center, 0), row by row."""
    if base is None:
        base = float(_cost_value(fn(center, 0)).to("cpu", torch.float64))

    def evaluate(rows: torch.Tensor, mults: torch.Tensor) -> torch.Tensor:
        values = []
        for row, m in zip(rows.tolist(), mults.tolist()):
            vec = rows_of(row)
            values.append(_cost_value(fn(center, (m * vec.to(torch.float64)).to(perturbation_dtype))))
        if len({v.device for v in values}) == 1:
            stacked = torch.stack([v.to(torch.float64) for v in values]).cpu()
        else:
            stacked = torch.stack([v.to("cpu", torch.float64) for v in values])
        return stacked - base

    return search_radii(evaluate, initial, cap, cutoff, rtol=rtol, max_evals=operator.index(iters) + 1)


def _check_count(value, name: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if isinstance(value, bool) or count is None or count < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return count


def _check_search_options(rtol, iters, init_mult, jump) -> None:
    try:
        ok = 0 < float(rtol) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"rtol must be in (0, 1) (relative tolerance on |delta - cutoff| / cutoff), got {rtol!r}")
    try:
        ok = not isinstance(iters, bool) and operator.index(iters) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    if not (math.isfinite(float(init_mult)) and float(init_mult) > 0):
        raise ValueError(f"init_mult must be a positive number, got {init_mult!r}")
    if not float(jump) > 1:
        raise ValueError(f"jump must be > 1, got {jump!r}")


def _warn_statuses(status: list[str], where: str, unbounded_note: str | None) -> None:
    counts = {k: v for k, v in Counter(status).items() if k != CONVERGED}
    if not counts:
        return
    parts = []
    for name, count in sorted(counts.items()):
        if name == UNBOUNDED and unbounded_note:
            parts.append(f"{count} {name} ({unbounded_note})")
        else:
            parts.append(f"{count} {name}")
    warnings.warn(
        f"{where}: of {len(status)} directions, " + "; ".join(parts) + " (see localvol_fast.search for the names)",
        RuntimeWarning,
        stacklevel=3,
    )


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
    _check_search_options(rtol, iters, init_mult, jump)
    if isinstance(vecs, torch.Tensor):
        if vecs.dim() != 2:
            raise ValueError(f"vecs must be a (B, D) tensor or a sequence of (D,) tensors, got shape {tuple(vecs.shape)}")
        rows_of, count, first = (lambda i: vecs[i]), vecs.shape[0], vecs
    else:
        vecs = list(vecs)
        if not vecs or not all(isinstance(v, torch.Tensor) for v in vecs):
            raise TypeError("vecs must be a (B, D) tensor or a non-empty sequence of (D,) tensors")
        rows_of, count, first = (lambda i: vecs[i]), len(vecs), vecs[0]
    device = first.device
    if count == 0:
        empty = torch.empty(0, dtype=torch.float64, device=device)
        return empty, empty.clone()
    dtype = first.dtype if first.is_floating_point() else torch.float64
    outcome = _search(
        center,
        rows_of,
        fn,
        eps,
        rtol=float(rtol),
        iters=iters,
        initial=torch.full((count,), float(init_mult), dtype=torch.float64),
        cap=torch.full((count,), math.inf, dtype=torch.float64),
        perturbation_dtype=dtype,
    )
    _warn_statuses(outcome.status, "find_radius_vectorized", None)
    return outcome.radii.to(device), outcome.deltas.to(device)


# ----- the estimators --------------------------------------------------------------------------------------
@dataclass
class _Batch:
    estimates: torch.Tensor
    props: torch.Tensor
    mults: torch.Tensor
    deltas: torch.Tensor
    gaussint: torch.Tensor | None
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
    """DirectionStats of the vectors w (B, D) float64 with props = |w| (so sq_norm_g = 1)."""
    x = center.detach().to(device=w.device, dtype=torch.float64).reshape(1, -1)
    nu = None if weights is None else weights.to(w.device).reshape(1, -1)
    sq = (w * w).sum(1)
    dot = (w * x).sum(1) if nu is None else (w * x * nu).sum(1)
    sq_weighted = sq if nu is None else (w * w * nu).sum(1)
    cpu = lambda t: t.to("cpu", torch.float64)  # noqa: E731
    return DirectionStats(
        sq_norm_g=torch.ones(w.shape[0], dtype=torch.float64),
        sq_norm_pg=cpu(sq),
        dot_anchor=cpu(dot),
        sq_norm_weighted=cpu(sq_weighted),
        box_exit_factor=torch.full((w.shape[0],), math.inf, dtype=torch.float64),
    )


class _GaussianTerms:
    """tyche's split of the Gaussian estimate: gaussint (with the anchor term c) and the constant rest."""

    def __init__(self, center: torch.Tensor, sigma):
        self.measure = make_measure("gaussian", center.detach(), sigma=sigma)
        self.c = self.measure.anchor_log_density_term
        self.log_const = log_sphere_area(self.measure.dim) + self.measure.log_normalizer


def _estimate_directions(
    w: torch.Tensor,
    log_det: float,
    *,
    center: torch.Tensor,
    fn: Callable,
    base: float,
    gaussian: _GaussianTerms | None,
    cutoff: float,
    rtol: float,
    iters: int,
    initial: float,
) -> _Batch:
    """Search and estimate along the given vectors w (B, D) float64 (unit vectors, preconditioned)."""
    dim = center.numel()
    weights = gaussian.measure.weights if gaussian is not None else None
    stats = _direction_stats(w, center, weights)
    props = stats.props
    if gaussian is not None:
        cap_radius = gaussian.measure.radius_cap(stats)
    else:
        cap_radius = UniformMeasure(center.detach()).radius_cap(stats)
    outcome = _search(
        center,
        lambda i: w[i],
        fn,
        cutoff,
        rtol=rtol,
        iters=iters,
        initial=torch.full((w.shape[0],), float(initial), dtype=torch.float64),
        cap=cap_radius / props,
        perturbation_dtype=center.dtype,
        base=base,
    )
    unbounded = torch.tensor([s == UNBOUNDED for s in outcome.status], dtype=torch.bool)
    mults = torch.where(unbounded, torch.full_like(outcome.radii, math.inf), outcome.radii)
    log_props = torch.log(props)
    if gaussian is not None:
        a, b = gaussian.measure.radial_coefficients(stats)
        gaussint = log_radial_integral(float(dim - 1), a, b, mults * props) + gaussian.c
        estimates = gaussint + gaussian.log_const - dim * log_props + log_det
    else:
        gaussint = None
        estimates = log_ball_volume(dim) + dim * torch.log(mults) + log_det
    return _Batch(estimates, props, mults, outcome.deltas, gaussint, outcome.status, outcome.n_evals)


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
    sigma: scalar (or a (D,) tensor, or None for the RMS of ``params``); preconditioner: see the module
    docstring (typically ``diag_preconditioner(adam_exp_avg_sq, eps=1e-5)``); fn(center, vec) or
    unary_fn(theta); params: the flat (D,) anchor; seed: ``torch.manual_seed`` before the first draw.
    cutoff, rtol, iters, init_mult, jump: the radius search (see ``find_radius_vectorized``).
    tol, y_tol, gaussint_fn: accepted for compatibility and ignored (the integral here is exact).
    Returns ``VolumeResult(estimates, props, mults, deltas, gaussint)``; ``aggregate(result.estimates)``
    is the log-probability. See the module docstring for what differs from tyche.
    """
    del tol, y_tol, gaussint_fn  # tyche's approximate integral needed them; log_radial_integral does not
    center = _check_params(params)
    fn = _resolve_fn(fn, unary_fn)
    _check_count(n, "n")
    batch_size = n if batch_size is None else _check_count(batch_size, "batch_size")
    eps = check_cutoff(cutoff)
    _check_search_options(rtol, iters, init_mult, jump)
    gaussian = _GaussianTerms(center, sigma)
    dim = center.numel()
    base = float(_cost_value(fn(center, 0)).to("cpu", torch.float64))

    batches: list[_Batch] = []
    bar = ProgressBar(n, enabled=bool(with_tqdm))
    start_mult = float(init_mult)
    for start, g in _draw_batches(n, dim, batch_size, center.device, seed):
        w, log_det = _precondition(preconditioner, g)
        batch = _estimate_directions(
            w, log_det, center=center, fn=fn, base=base, gaussian=gaussian, cutoff=eps, rtol=float(rtol),
            iters=iters, initial=start_mult,
        )
        del w
        batches.append(batch)
        start_mult = typical_radius(torch.cat([b.mults for b in batches]), start_mult)
        bar.update(g.shape[0], evals=float(batch.n_evals.double().mean()))
        if debug:
            print(
                f"[compat] directions {start}..{start + g.shape[0] - 1}: evals/direction "
                f"{float(batch.n_evals.double().mean()):.3g}, status {dict(Counter(batch.status))}, "
                f"estimates [{float(batch.estimates.min()):.6g}, {float(batch.estimates.max()):.6g}], "
                f"log det P {log_det:.3g}"
            )
    bar.close()

    cat = lambda name: torch.cat([getattr(b, name) for b in batches]).to(center.device)  # noqa: E731
    status = [s for b in batches for s in b.status]
    _warn_statuses(status, "get_estimates_vectorized_gauss", "the ray stays inside while the Gaussian has mass; integrated exactly to infinity")
    return VolumeResult(
        estimates=cat("estimates"),
        props=cat("props"),
        mults=cat("mults"),
        deltas=cat("deltas"),
        gaussint=cat("gaussint"),
        status=status,
        n_evals=cat("n_evals"),
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
    _check_count(n, "n")
    eps = check_cutoff(cutoff)
    _check_search_options(rtol, iters, init_mult, jump)
    base = float(_cost_value(fn(center, 0)).to("cpu", torch.float64))
    (_, g), = _draw_batches(n, center.numel(), n, center.device, seed)
    w, log_det = _precondition(preconditioner, g)
    batch = _estimate_directions(
        w, log_det, center=center, fn=fn, base=base, gaussian=None, cutoff=eps, rtol=float(rtol),
        iters=iters, initial=float(init_mult),
    )
    _warn_statuses(batch.status, "get_estimates_vectorized", "never reached the cutoff: infinite volume")
    to = lambda t: t.to(center.device)  # noqa: E731
    return to(batch.estimates), to(batch.props), to(batch.mults), to(batch.deltas)


# ----- VolumeConfig / VolumeEstimator (tyche's estimator.py) ----------------------------------------------
_CAUSAL_DEFAULTS = {"data_batch_size": None, "max_seq_len": 2048, "val_size": 10, "text_key": "text"}
_LOGIT_ELEMENTS_PER_BATCH = 1 << 25  # data_batch_size=None: rows per forward so that rows * T * vocab stays near this
_CHUNK_GROUP = 2048  # chunking packs this many examples at a time and drops each group's last chunk, as tyche does
_PRECONDITIONER_TYPES = (None, "adam", "fisher")


@dataclass
class VolumeConfig:
    """tyche's ``VolumeConfig`` (``src/tyche/estimator.py``): the same fields, in the same order, same defaults.

    Fields used (model_type="causal", the Hugging Face path):
      model: a causal LM (``nn.Module``; its ``forward`` takes ``input_ids`` / ``attention_mask`` and returns
          logits or an object with ``.logits``), on the device the run should use (CPU or CUDA).
      tokenizer: a Hugging Face tokenizer; needed when the dataset holds text. Its ``padding_side`` and
          ``truncation_side`` are respected; no pad token is needed (padding is masked).
      dataset: a ``datasets.Dataset``, a list of dicts ``{text_key: str}``, a dict of columns
          ``{text_key: [str, ...]}`` or a list of strings; or already tokenized examples (dicts with
          ``input_ids`` and optionally ``attention_mask``, a dict/BatchEncoding of (N, T) tensors, or an
          (N, T) integer tensor), which need no tokenizer.
      text_key ("text"), val_size (10 sequences), max_seq_len (2048 tokens, truncation), chunking (False:
          one padded sequence per example; True: tyche's GPT-style packing into full max_seq_len chunks).
      n_samples (100 directions), cutoff (1e-2 nats), seed (42), tqdm (progress), sigma (None: the RMS of
          the parameters), l2_reg (0.0: the cost is KL + l2_reg/2 |theta - theta0|^2, as in tyche),
      model_batch_size (directions searched together), data_batch_size (sequences per forward pass),
      preconditioner_type (None, "adam" or "fisher"), preconditioner_eps, preconditioner_exponent, adam_order.
      debug: print the resolved settings.
    Accepted and ignored: tol, y_tol (tyche's approximate Gaussian integral; ours is exact), cache_mode (the
    anchor's log-probabilities are always cached, on the model's device), implicit_vectors, block_size,
    model_name, checkpoint_step, split (used by tyche's Pythia/ConvNeXt loaders only).
    Not in tyche: ``optimizer`` (a torch Adam/AdamW that trained ``model``, or its ``state_dict()``, for
    preconditioner_type="adam"), ``fisher_passes`` (backward passes of the "fisher" preconditioner) and
    ``rtol`` (search tolerance; tyche's run() uses 1e-2). See ``VolumeEstimator`` for the full mapping.
    """

    # Common parameters
    n_samples: int = 100
    model_batch_size: int | None = None
    sigma: float | None = None
    l2_reg: float = 0.0
    cutoff: float = 1e-2
    tol: float = 1e-2
    y_tol: float = 5
    seed: int = 42
    tqdm: bool = True
    debug: bool = False
    reduction: str | None = "mean"
    # Model-specific parameters
    model_type: str = "causal"
    model_name: str | None = None
    checkpoint_step: int | None = None
    val_size: int | None = None
    split: str | None = None
    # Hugging Face models and data
    model: object = None
    tokenizer: object = None
    dataset: object = None
    text_key: str | None = None
    max_seq_len: int | None = None
    cache_mode: str | None = None
    chunking: bool = False
    data_batch_size: int | None = None
    implicit_vectors: bool = False
    block_size: int = 1024**2
    # Preconditioner
    preconditioner_type: str | None = None
    preconditioner_eps: float = 1e-5
    preconditioner_exponent: float = 0.5
    adam_order: int = 2
    # localvol_fast additions (not in tyche)
    optimizer: object = None
    fisher_passes: int = 16
    rtol: float = 1e-2


def _positive_int(value, name: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if isinstance(value, bool) or count is None or count < 1:
        raise ValueError(f"VolumeConfig.{name} must be a positive integer, got {value!r}")
    return count


def _token_row(ids, mask=None) -> list[int]:
    """The real tokens of one tokenized example (positions whose mask is 1), as a list of ints."""
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() == 0:
        return []
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(-1)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has {mask.numel()} entries but input_ids has {ids.numel()}")
        ids = ids[mask.bool()]
    return [int(t) for t in ids.tolist()]


class VolumeEstimator:
    """tyche's ``VolumeEstimator``: ``VolumeEstimator.from_config(VolumeConfig(...)).run()``.

    The run is ``localvol_fast.estimate(model, estimator.data, neighborhood="kl", measure="gaussian", ...)``
    on the tokenized sequences, on the device the model is on (tyche always moves the model to CUDA).

    Field mapping (tyche -> localvol_fast):
      n_samples -> n_samples; cutoff -> cutoff; seed -> seed; tqdm -> progress; rtol (1e-2, tyche's
      value) -> rtol; sigma -> sigma (None: the RMS of the perturbed parameters, as tyche's run() does);
      model_batch_size -> batch_size (directions searched together, several probes per vmapped forward;
      None: chosen automatically. tyche's default of 1 is only a memory setting: the directions and
      results do not depend on it here);
      data_batch_size -> the sequences are split into batches of this many rows (None: as many as keep
      rows * T * vocab near 2^25 logits per forward; the cost, a mean over all real tokens, does not
      depend on it);
      val_size -> the first val_size examples (chunking: the first val_size chunks);
      max_seq_len -> truncation (tokenizer's truncation_side) or the chunk length;
      l2_reg -> the cost becomes mean-token KL(anchor || theta) + l2_reg / 2 * |theta - theta0|^2, which
      is what tyche adds to its KL (it does not derive sigma from l2_reg);
      preconditioner_type: None -> isotropic directions; "adam" -> ``preconditioner="adam"`` with
      ``optimizer=config.optimizer`` (adam_order 2: 1 / (exp_avg_sq^exponent + eps); adam_order 1: the
      same with |exp_avg|). tyche has no Adam state for Hugging Face models and raises
      NotImplementedError there; without ``optimizer`` this raises and points to "fisher".
      "fisher" (not in tyche) -> ``preconditioner="fisher"``: 1 / (diag Fisher^exponent + eps) from
      ``fisher_passes`` backward passes, the usable choice when no optimizer state exists.
      preconditioner_eps / preconditioner_exponent -> preconditioner_eps / preconditioner_exponent.
      reduction: only "mean" (per-sequence costs are not supported). model_type: only "causal" (tyche's
      "pythia" / "convnext" paths download checkpoints; build the model and use "causal").

    Differences from tyche (on purpose):
      - The data: padding positions are excluded through the attention mask, which is also passed to the
        model with matching position ids (tyche passes only input_ids and masks tokens equal to
        pad_token_id, which also drops real tokens equal to it, e.g. EOS when pad = EOS, and breaks left
        padding). Examples with no tokens are dropped; the first val_size examples are tokenized
        (tyche tokenizes the whole dataset, padded to its longest example, then keeps val_size rows).
      - The perturbed parameters are the trainable floating-point ones (tyche: all of them).
      - The directions come from localvol_fast's counter-based stream for ``seed`` (not
        ``torch.manual_seed(seed); torch.randn``), so they differ from tyche's; the radius search and the
        Gaussian integral are localvol_fast's (see the module docstring).
      - The model's weights and train/eval modes are restored after the run (tyche leaves the last
        probe's weights in the model). The config passed in is not modified: the resolved copy is
        ``estimator.config`` (its ``sigma`` is set to the value used after run(), as tyche sets it).
      - chunking: the texts of each group of 2,048 examples are joined with the EOS token (also first),
        tokenized once and cut into chunks of min(max_seq_len, tokenizer.model_max_length) tokens; the last
        chunk of each group is dropped (tyche's chunk_and_tokenize, which needs ``datasets``; special
        tokens are added once per group rather than per chunk).

    Results: ``run()`` returns the compat ``VolumeResult(estimates, props, mults, deltas, gaussint)``
    (float64 on the model's device; ``mults = radii / props``, and ``gaussint`` is defined so that
    ``estimates = gaussint + log V_D + log D - (D/2) log(2 pi sigma^2) - D log props`` holds, as in tyche).
    ``run(native=True)`` returns the ``localvol_fast.VolumeResult`` instead (summary(), bootstrap interval,
    info); after any run the native one is also ``estimator.native_result``.
    Attributes: ``data`` (the list of {"input_ids", "attention_mask"} batches given to ``estimate``),
    ``tokens`` (all rows, one dict of (N, T) tensors), ``notes``.
    """

    def __init__(self, config: VolumeConfig):
        if not isinstance(config, VolumeConfig):
            raise TypeError(f"config must be a VolumeConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config)
        self.notes: list[str] = []
        self.native_result = None
        self._set_defaults()
        self._check_config()
        self.model = self.config.model
        self.tokenizer = self.config.tokenizer
        self.device = next(iter(self.model.parameters())).device
        self.tokens = self._tokenize()
        self.data = self._batches(self.tokens)
        if self.config.debug:
            n, t = self.tokens["input_ids"].shape
            print(
                f"[VolumeEstimator] {n} sequences of {t} tokens ({int(self.tokens['attention_mask'].sum())} real) "
                f"in {len(self.data)} batches on {self.device}; notes: {self.notes}"
            )

    @classmethod
    def from_config(cls, config: VolumeConfig) -> "VolumeEstimator":
        """Build the estimator for ``config`` (tokenizes the data now, so data errors surface here)."""
        model_type = getattr(config, "model_type", "causal")
        if model_type == "causal":
            return CausalLMEstimator(config)
        if model_type in ("pythia", "convnext", "mlp"):
            raise NotImplementedError(
                f"model_type={model_type!r} loads tyche's own checkpoints and data sets, which localvol_fast does "
                "not download; load the model yourself and pass model_type='causal' with model=, tokenizer= and "
                "dataset= (or call localvol_fast.estimate for image models)"
            )
        raise ValueError(f"Invalid model type: {model_type!r} (expected 'causal')")

    # ----- configuration ---------------------------------------------------------------------------
    def _set_defaults(self) -> None:
        for name, value in _CAUSAL_DEFAULTS.items():
            if getattr(self.config, name) is None:
                setattr(self.config, name, value)

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.model is None:
            raise ValueError("VolumeConfig.model is required: the causal language model (an nn.Module)")
        if not isinstance(cfg.model, torch.nn.Module):
            raise TypeError(
                f"VolumeConfig.model must be a loaded model (torch.nn.Module, e.g. AutoModelForCausalLM."
                f"from_pretrained(...)), got {type(cfg.model).__name__}"
            )
        if not any(True for _ in cfg.model.parameters()):
            raise ValueError("VolumeConfig.model has no parameters")
        if cfg.dataset is None:
            raise ValueError("VolumeConfig.dataset is required: the evaluation texts (or tokenized examples)")
        if cfg.reduction != "mean":
            raise NotImplementedError(
                f"reduction={cfg.reduction!r}: only 'mean' (the mean KL over all real tokens) is supported"
            )
        if cfg.cache_mode not in (None, "cpu", "gpu"):
            raise ValueError(f"Invalid cache mode: {cfg.cache_mode!r} (None, 'cpu' or 'gpu')")
        if cfg.preconditioner_type not in _PRECONDITIONER_TYPES:
            raise ValueError(
                f"Invalid preconditioner type: {cfg.preconditioner_type!r}; expected None, 'adam' (needs "
                "VolumeConfig.optimizer) or 'fisher'"
            )
        if cfg.preconditioner_type == "adam":
            if cfg.optimizer is None:
                raise ValueError(
                    "preconditioner_type='adam' needs the optimizer state of the training run: pass "
                    "VolumeConfig(optimizer=...) (the torch Adam/AdamW that trained this model, or its state_dict()). "
                    "tyche has none for Hugging Face models (it raises NotImplementedError); without one use "
                    "preconditioner_type='fisher' (diagonal Fisher at the anchor)"
                )
            if cfg.adam_order not in (1, 2):
                raise ValueError(f"Invalid ADAM order: {cfg.adam_order!r} (1 for exp_avg, 2 for exp_avg_sq)")
        elif cfg.optimizer is not None:
            raise ValueError("VolumeConfig.optimizer is used by preconditioner_type='adam'; set it or drop optimizer")
        if not isinstance(cfg.text_key, str):
            raise TypeError(f"VolumeConfig.text_key must be a string, got {cfg.text_key!r}")
        cfg.val_size = _positive_int(cfg.val_size, "val_size")
        cfg.max_seq_len = _positive_int(cfg.max_seq_len, "max_seq_len")
        if cfg.data_batch_size is not None:
            cfg.data_batch_size = _positive_int(cfg.data_batch_size, "data_batch_size")
        if cfg.model_batch_size is not None:
            cfg.model_batch_size = _positive_int(cfg.model_batch_size, "model_batch_size")
        try:
            l2 = float(cfg.l2_reg)
        except (TypeError, ValueError):
            l2 = math.nan
        if not (math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"VolumeConfig.l2_reg must be a finite number >= 0, got {cfg.l2_reg!r}")
        cfg.l2_reg = l2
        if isinstance(cfg.sigma, torch.Tensor):
            cfg.sigma = float(cfg.sigma) if cfg.sigma.numel() == 1 else cfg.sigma.detach()
        ignored = []
        if cfg.implicit_vectors:
            ignored.append("implicit_vectors (directions are materialized per batch of model_batch_size)")
        if cfg.cache_mode is not None:
            ignored.append(
                f"cache_mode={cfg.cache_mode!r} (the anchor's log-probabilities are always cached, on the model's device)"
            )
        if ignored:
            self.notes.append("ignored: " + "; ".join(ignored))

    # ----- data --------------------------------------------------------------------------------------
    def _first_examples(self, count: int | None):
        """The first ``count`` examples of the dataset (all when None), as a list."""
        dataset = self.config.dataset
        if isinstance(dataset, Mapping):
            key = self.config.text_key
            if key in dataset:  # a dict of columns, e.g. dataset[:n] of a datasets.Dataset
                column = dataset[key]
                if isinstance(column, str):
                    raise TypeError(f"dataset[{key!r}] must be a list of texts, got a single string")
                return list(column if count is None else itertools.islice(column, count)), "text"
            if "input_ids" in dataset:  # a BatchEncoding / dict of (N, T) tensors
                ids = torch.as_tensor(dataset["input_ids"])
                if ids.dim() == 1:
                    ids = ids.reshape(1, -1)
                mask = dataset.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
                rows = [(ids[k], mask[k]) for k in range(ids.shape[0] if count is None else min(count, ids.shape[0]))]
                return rows, "pairs"
            keys = sorted(map(str, dataset))[:10]
            raise ValueError(
                f"text_key {key!r} is not a column of the dataset (keys: {keys}); set VolumeConfig.text_key, or "
                "pick one split of a DatasetDict"
            )
        if isinstance(dataset, torch.Tensor):
            ids = dataset.reshape(1, -1) if dataset.dim() == 1 else dataset
            if ids.dim() != 2:
                raise ValueError(f"a tensor dataset must be (N, T) token ids, got shape {tuple(dataset.shape)}")
            n = ids.shape[0] if count is None else min(count, ids.shape[0])
            return [(ids[k], None) for k in range(n)], "pairs"
        if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Iterable):
            raise TypeError(
                "dataset must be a datasets.Dataset, a list of dicts {text_key: text}, a dict of columns, a list "
                f"of strings, or tokenized examples; got {type(dataset).__name__}"
            )
        items = list(dataset if count is None else itertools.islice(iter(dataset), count))
        return items, "items"

    def _rows_of(self, items, kind: str) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) for text data, (None, token rows) for tokenized data."""
        if kind == "text":
            texts = items
        elif kind == "pairs":
            return None, [_token_row(ids, mask) for ids, mask in items]
        else:
            key = self.config.text_key
            first = items[0]
            if isinstance(first, str):
                texts = items
            elif isinstance(first, Mapping) and key not in first and "input_ids" in first:
                rows = []
                for k, item in enumerate(items):
                    if not isinstance(item, Mapping) or "input_ids" not in item:
                        raise ValueError(f"example {k} has no 'input_ids' (the first example is tokenized)")
                    rows.append(_token_row(item["input_ids"], item.get("attention_mask")))
                return None, rows
            elif isinstance(first, Mapping):
                texts = []
                for k, item in enumerate(items):
                    if not isinstance(item, Mapping) or key not in item:
                        found = sorted(map(str, item))[:10] if isinstance(item, Mapping) else type(item).__name__
                        raise ValueError(
                            f"text_key {key!r} is missing from example {k} of the dataset (it has {found}); "
                            "set VolumeConfig.text_key to the field holding the text"
                        )
                    texts.append(item[key])
            else:
                raise TypeError(
                    f"the dataset's examples must be strings or dicts with {key!r}, got {type(first).__name__}"
                )
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"example {k}: the text under {self.config.text_key!r} must be a string, got {type(text).__name__}"
                )
        return texts, None

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "the dataset holds text, so VolumeConfig.tokenizer is required (e.g. AutoTokenizer.from_pretrained"
                "(...)); or pass tokenized examples (dicts with 'input_ids') as the dataset"
            )
        if not callable(self.tokenizer):
            raise TypeError(f"VolumeConfig.tokenizer must be a callable tokenizer, got {type(self.tokenizer).__name__}")
        return self.tokenizer

    def _tokenize(self) -> dict:
        cfg = self.config
        if cfg.chunking:
            rows = self._chunk_rows()
        else:
            items, kind = self._first_examples(cfg.val_size)
            if not items:
                raise ValueError("the dataset is empty: the KL neighborhood needs at least one example")
            texts, rows = self._rows_of(items, kind)
            if texts is not None:
                tokenizer = self._require_tokenizer()
                encoded = tokenizer(texts, truncation=True, max_length=cfg.max_seq_len, padding=False)
                rows = [_token_row(ids) for ids in encoded["input_ids"]]
            side = getattr(self.tokenizer, "truncation_side", "right")
            rows = [r[-cfg.max_seq_len :] if side == "left" else r[: cfg.max_seq_len] for r in rows]
        empty = sum(1 for r in rows if not r)
        rows = [r for r in rows if r]
        if empty:
            self.notes.append(f"{empty} example(s) with no tokens were dropped (they carry no positions)")
        if not rows:
            raise ValueError("every selected example tokenizes to no tokens: there is nothing to evaluate on")
        return self._pad(rows)

    def _chunk_rows(self) -> list[list[int]]:
        """tyche's GPT-style packing: full chunks only, the last one of each group of examples dropped."""
        cfg = self.config
        tokenizer = self._require_tokenizer()
        limit = getattr(tokenizer, "model_max_length", None)
        size = cfg.max_seq_len if not isinstance(limit, int) else max(1, min(cfg.max_seq_len, limit))
        separator = getattr(tokenizer, "eos_token", None) or "<|endoftext|>"
        items, kind = self._first_examples(None)
        if not items:
            raise ValueError("the dataset is empty: the KL neighborhood needs at least one example")
        texts, _ = self._rows_of(items, kind)
        if texts is None:
            raise ValueError("chunking=True packs texts; the dataset holds tokenized examples (use chunking=False)")
        chunks: list[list[int]] = []
        for start in range(0, len(texts), _CHUNK_GROUP):
            joined = separator.join([""] + texts[start : start + _CHUNK_GROUP])
            ids = _token_row(tokenizer(joined, verbose=False)["input_ids"])
            pieces = [ids[k : k + size] for k in range(0, len(ids), size)]
            chunks.extend(pieces[:-1])
            if len(chunks) >= cfg.val_size:
                break
        if not chunks:
            raise ValueError(
                f"Not enough data to create a single complete chunk of {size} tokens: pass more text, a smaller "
                "max_seq_len, or chunking=False"
            )
        return chunks[: cfg.val_size]

    def _pad(self, rows: list[list[int]]) -> dict:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(self.tokenizer, "eos_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for k, r in enumerate(rows):
            span = slice(length - len(r), length) if left else slice(0, len(r))
            ids[k, span] = torch.tensor(r, dtype=torch.long)
            mask[k, span] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _batches(self, tokens: dict) -> list[dict]:
        n, length = tokens["input_ids"].shape
        size = self.config.data_batch_size
        if size is None:
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
            per_row = length * (vocab if isinstance(vocab, int) and vocab > 0 else 1)
            size = max(1, min(n, _LOGIT_ELEMENTS_PER_BATCH // max(per_row, 1)))
            self.config.data_batch_size = size
        return [{k: v[lo : lo + size] for k, v in tokens.items()} for lo in range(0, n, size)]

    # ----- the run -----------------------------------------------------------------------------------
    def _preconditioner_args(self) -> dict:
        cfg = self.config
        kind = cfg.preconditioner_type
        if kind is None:
            return {"preconditioner": None}
        if kind == "fisher":
            return {"preconditioner": "fisher", "fisher_passes": cfg.fisher_passes}
        if cfg.adam_order == 2:
            return {"preconditioner": "adam", "optimizer": cfg.optimizer}
        # adam_order 1: |exp_avg| in place of exp_avg_sq, passed to estimate as a ready (D,) tensor
        named = select_parameters(self.model)
        params = [p for _, p in named]
        source = cfg.optimizer
        if not isinstance(source, torch.optim.Optimizer):
            source = selected_optimizer_state(source, self.model, named)
        p = adam_preconditioner(
            source, params=params, exponent=cfg.preconditioner_exponent, eps=cfg.preconditioner_eps, moment=1
        )
        return {"preconditioner": p.to(self.device)}

    def _estimate(self):
        cfg = self.config
        kwargs = dict(
            cutoff=cfg.cutoff,
            n_samples=cfg.n_samples,
            measure="gaussian",
            sigma=cfg.sigma,
            seed=cfg.seed,
            rtol=cfg.rtol,
            batch_size=cfg.model_batch_size,
            progress=bool(cfg.tqdm),
            preconditioner_exponent=cfg.preconditioner_exponent,
            preconditioner_eps=cfg.preconditioner_eps,
            **self._preconditioner_args(),
        )
        return estimate(self.model, self.data, l2_reg=cfg.l2_reg, **kwargs)

    def run(self, native: bool = False):
        """Estimate; returns tyche's ``VolumeResult`` (or with ``native=True`` the localvol_fast one)."""
        result = self._estimate()
        result.info.setdefault("notes", [])
        result.info["notes"] = self.notes + result.info["notes"]
        result.config.update(
            val_size=int(self.tokens["input_ids"].shape[0]),
            max_seq_len=self.config.max_seq_len,
            chunking=bool(self.config.chunking),
            l2_reg=self.config.l2_reg,
            data_batch_size=self.config.data_batch_size,
            preconditioner_type=self.config.preconditioner_type,
        )
        self.native_result = result
        sigma = result.measure.get("sigma")
        if not isinstance(self.config.sigma, torch.Tensor):
            self.config.sigma = sigma
        if self.config.debug:
            print(f"[VolumeEstimator] sigma = {sigma}\n{result.summary()}")
        return result if native else self.to_tyche(result)

    def to_tyche(self, result) -> VolumeResult:
        """The compat ``VolumeResult`` (tyche's fields) of a native result of this estimator."""
        dim = result.dim
        props = result.props.double()
        sigma = self.config.sigma
        if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
            sum_log_sigma = float(torch.log(sigma.double()).sum())
        else:
            sum_log_sigma = dim * math.log(float(result.measure["sigma"]))
        log_const = log_sphere_area(dim) - 0.5 * dim * _LOG_2PI - sum_log_sigma
        to = lambda t: t.to(self.device)  # noqa: E731
        return VolumeResult(
            estimates=to(result.estimates.double()),
            props=to(props),
            mults=to(result.radii.double() / props),
            deltas=to(result.deltas.double()),
            gaussint=to(result.estimates.double() - log_const + dim * torch.log(props)),
            status=list(result.status),
            n_evals=to(result.n_evals),
        )


class CausalLMEstimator(VolumeEstimator):
    """The estimator ``VolumeEstimator.from_config`` returns for model_type="causal" (as in tyche)."""
