"""Drop-in names for scripts written against ``tyche``, the package of EleutherAI's basin-volume repository.

Switching a script
------------------
    import tyche                                        ->  from localvol_fast import compat as tyche
    from tyche.volume import get_estimates_vectorized_gauss, aggregate, VolumeResult
                                                        ->  from localvol_fast.compat import ...  (same names)
    from tyche.precondition import diag_preconditioner  ->  from localvol_fast.compat import diag_preconditioner

This follows ``src/tyche/volume.py``, ``src/tyche/precondition.py`` and ``src/tyche/estimator.py`` of
EleutherAI/basin-volume, in modules of the same names (``localvol_fast.compat.volume``, ``.precondition``,
``.estimator``); every name is also importable from ``localvol_fast.compat`` itself. (The later
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
- ``gaussint`` is computed by ``localvol_fast.core.radial.log_radial_integral``: exact to ~1e-13 in float64 for any
  D, radius (including infinity) and offset. It never raises "Approximation error too high" or
  "catastrophic cancellation"; ``tol``, ``y_tol`` and ``gaussint_fn`` are accepted and ignored.
- The radius search is ``localvol_fast.core.search.search_radii`` (log-log secant with brackets) instead of
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

from localvol_fast.compat.estimator import CausalLMEstimator, VolumeConfig, VolumeEstimator
from localvol_fast.compat.precondition import DiagPreconditioner, diag_preconditioner
from localvol_fast.compat.volume import (
    VolumeResult,
    aggregate,
    find_radius_vectorized,
    get_estimates_vectorized,
    get_estimates_vectorized_gauss,
    sample_directions,
)

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
