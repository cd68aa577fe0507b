"""The reference package's radius search, re-implemented faithfully: the speed benchmarks' baseline.

The reference is ``tyche`` in EleutherAI's basin-volume repository:

- ``src/tyche/volume.py``: ``get_estimates_vectorized_gauss`` draws u = g / |g|, forms the direction
  vector v = P u (length ``props`` = |P u|) and calls ``find_radius_vectorized(center, vecs, cutoff, fn,
  iters=100, rtol=1e-2)`` with ``init_mult=1`` and ``jump=2``. Every estimator of
  ``src/tyche/estimator.py`` defaults to ``model_batch_size=1``, so the search runs on ONE direction at
  a time, in a Python loop.
- ``find_radius_vectorized``: the multiplier m (theta = theta0 + m v) starts at 1. It evaluates
  C(m = 1), then the centre fn(center, 0) once per call, delta = C(m) - C(centre); then, while
  ``|delta - eps| > rtol * eps`` and fewer than ``iters`` iterations ran, it evaluates C(m) again (the
  first iteration repeats m = 1), sets lo = m where delta < eps and hi = m where delta > eps, and moves
  m to 2 m while hi is infinite, else to (lo + hi) / 2.
- The KL cost (``CausalLMEstimator.kl_fn`` with its default ``cache_mode=None``): each call runs the
  model at the perturbed parameters AND at the anchor on every data batch, and returns
  sum KL(softmax(anchor logits) || softmax(perturbed logits)) over non-padding positions / their count
  (``kl_div(log_softmax(q), softmax(p)).sum(-1)`` in the model's dtype). ``PythiaEstimator`` and
  ``ConvNextEstimator`` instead compute the anchor's probabilities once at set-up
  (``anchor_cache=True`` here).

Reproduced by default: all of the above (so a cost evaluation is 2 forward passes, plus the centre
evaluation and the repeated first probe of each direction). ``anchor_cache=True`` gives the cached-anchor
estimators' cost (1 forward pass per evaluation); ``extra_calls=False`` drops the centre evaluation
(C(centre) = 0) and the repeated first probe, leaving the bare doubling-and-bisection.

Deliberate differences, none of which changes what is searched:

- The radius returned is that of the accepted probe, m_accepted |v|. ``tyche`` returns the multiplier
  it would probe next (one more bisection step, off by one) with the delta of the accepted probe, so
  its radius and delta belong to different points.
- Directions are this package's: g_i = ``gaussian_directions(seed, [i], D)``, the same vectors as
  ``localvol_fast.estimate``'s directions with the same seed, so estimates compare per direction.
- Each direction's estimate uses this package's exact formula (``measures.make_measure`` and
  ``DirectionStats``; log ray measure - D log|P u| + log det P) rather than ``tyche``'s
  ``gaussint_ln_noncentral_erf``: only the search and the cost evaluation differ from ``estimate``.
- The multipliers are Python floats (float64); ``tyche`` keeps them in float32. The perturbed parameters
  are, as in ``tyche``, theta0 + m v in the parameters' dtype.
- The model is called with ``torch.func.functional_call`` (its weights are never written; ``tyche``
  copies the vector into the model with ``vector_to_parameters``), with the attention mask and, for
  padded batches, the same position ids as ``estimate`` uses; positions are masked by the attention
  mask (``tyche`` masks tokens equal to the pad token id).
- A NaN cost stops the search of that direction (status "nonfinite"); in ``tyche`` the NaN comparison
  ends the loop in the same way, silently.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable

import torch
from torch.func import functional_call

from localvol_fast.nn.data import prepare_batches
from localvol_fast.core.measures import DirectionStats, make_measure
from localvol_fast.nn.parameters import ParameterLayout, select_parameters
from localvol_fast.nn.neighborhoods import output_logits
from localvol_fast.ops.reference import stats_of_values
from localvol_fast.core.philox import gaussian_directions
from localvol_fast.core.preconditioners import log_det, normalize_preconditioner
from localvol_fast.core.result import log_mean_exp

INIT_MULT = 1.0  # tyche's init_mult
JUMP = 2.0  # tyche's jump
MAX_ITERS = 100  # the iters get_estimates_vectorized_gauss passes


def faithful_search(
    cost: Callable[[float], float],
    cutoff: float,
    *,
    rtol: float = 1e-2,
    init_mult: float = INIT_MULT,
    jump: float = JUMP,
    max_iters: int = MAX_ITERS,
    extra_calls: bool = True,
) -> dict:
    """``tyche.find_radius_vectorized`` for one direction, on ``cost(m)`` = C(theta0 + m v).

    extra_calls: evaluate the centre cost(0) once and repeat the first probe, as ``tyche`` does.
    Returns dict(mult: the accepted probe's multiplier (the last probe's when not converged),
    delta: cost(mult) - cost(0), evals: number of cost calls, iterations: loop iterations run,
    status: "converged" / "nonfinite" / "unbounded" (no probe above eps) / "not_converged",
    probes: the multipliers evaluated, in order (0.0 for the centre)).
    """
    eps = float(cutoff)
    probes: list[float] = []

    def evaluate(m: float) -> float:
        probes.append(m)
        return float(cost(m))

    m = float(init_mult)
    value = evaluate(m)
    center = evaluate(0.0) if extra_calls else 0.0
    delta, accepted = value - center, m
    lo, hi = 0.0, math.inf
    iterations = 0
    # NaN: |NaN - eps| > tol is False, so the loop ends, as in tyche.
    while iterations < max_iters and abs(delta - eps) > rtol * eps:
        if iterations > 0 or extra_calls:  # tyche's first iteration re-evaluates m = init_mult
            delta, accepted = evaluate(m) - center, m
        if delta < eps:
            lo = m
        if delta > eps:
            hi = m
        m = m * jump if hi == math.inf else (lo + hi) / 2
        iterations += 1
    if math.isnan(delta):
        status = "nonfinite"
    elif abs(delta - eps) <= rtol * eps:
        status = "converged"
    elif hi == math.inf:
        status = "unbounded"
    else:
        status = "not_converged"
    return {
        "mult": accepted,
        "delta": delta,
        "evals": len(probes),
        "iterations": iterations,
        "status": status,
        "probes": probes,
    }


class _KLCost:
    """C(theta) = mean over positions of KL(anchor || theta), evaluated as tyche's ``kl_fn`` does."""

    def __init__(self, model, batches, named, anchor_cache: bool):
        self.model, self.batches = model, batches
        self.layout = ParameterLayout(named)
        self.anchor = self.layout.flatten()
        self.anchor_params = self.layout.split(self.anchor)
        self._add_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.n_forward = 0
        self.anchor_probs = None
        if anchor_cache:  # PythiaEstimator / ConvNextEstimator: the anchor's probabilities, once
            self.anchor_probs = [self._probs(self.anchor_params, b) for b in batches]

    def _kwargs(self, batch) -> dict:
        kwargs = dict(batch.kwargs)
        if self._add_positions and batch.mask is not None and "position_ids" not in kwargs:
            kwargs["position_ids"] = (batch.mask.long().cumsum(-1) - 1).clamp_min(0)  # as estimate() does
        return kwargs

    def _logits(self, params: dict, batch) -> torch.Tensor:
        self.n_forward += 1
        return output_logits(functional_call(self.model, params, batch.args, self._kwargs(batch)))

    def _probs(self, params: dict, batch) -> torch.Tensor:
        return torch.softmax(self._logits(params, batch), dim=-1)

    @torch.no_grad()
    def __call__(self, theta: torch.Tensor) -> float:
        params = self.layout.split(theta)
        total, count = 0.0, 0.0
        for k, batch in enumerate(self.batches):
            log_q = torch.log_softmax(self._logits(params, batch), dim=-1)
            p = self.anchor_probs[k] if self.anchor_probs is not None else self._probs(self.anchor_params, batch)
            per_position = torch.nn.functional.kl_div(log_q, p, reduction="none").sum(-1)
            if batch.mask is not None and per_position.dim() == batch.mask.dim():
                total += float(per_position[batch.mask].sum())
                count += float(batch.mask.sum())
            else:
                total += float(per_position.sum())
                count += per_position.numel()
        return total / count


def _check_options(cutoff, n_samples, rtol, max_iters) -> float:
    eps = float(cutoff)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"cutoff must be finite and positive (eps in nats), got {cutoff!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer (number of directions), got {n_samples!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    if not (isinstance(max_iters, int) and max_iters >= 1):
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    return eps


def baseline_estimate(
    model: torch.nn.Module,
    data,
    *,
    cutoff: float = 1e-2,
    n_samples: int = 100,
    measure: str = "gaussian",
    sigma=None,
    bounds=None,
    seed: int = 0,
    rtol: float = 1e-2,
    preconditioner: torch.Tensor | None = None,
    max_iters: int = MAX_ITERS,
    anchor_cache: bool = False,
    extra_calls: bool = True,
    first_index: int = 0,
) -> dict:
    """Per-direction local-volume estimates of ``model`` by the reference algorithm (module docstring).

    data: as for ``localvol_fast.estimate`` (KL neighborhood only). measure, sigma, bounds, seed: as there;
    direction i (i = first_index, ..., first_index + n_samples - 1) is the same vector as ``estimate``'s.
    preconditioner: None or a positive (D,) tensor (normalized to det P = 1, as ``estimate`` does).
    anchor_cache: False (tyche's CausalLMEstimator default) runs the anchor's forward pass in every cost
    evaluation; True computes its probabilities once. extra_calls: tyche's centre evaluation and
    repeated first probe per direction.

    Returns a dict of per-direction (n,) tensors ``indices``, ``estimates`` (nats), ``radii`` (along the
    unit direction), ``multipliers`` (tyche's mults, at the accepted probe), ``props`` (|P u|),
    ``deltas`` (C at the accepted probe minus C at the centre), ``evals`` (cost evaluations),
    ``forward_passes`` (model forward calls over one data batch each), ``seconds``; the list ``status``;
    and ``log_volume``, ``dim``, ``seconds_total`` (including set-up and directions),
    ``setup_forward_passes``, ``config``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    eps = _check_options(cutoff, n_samples, rtol, max_iters)
    started = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        named = select_parameters(model, None)
        device = named[0][1].device
        batches, _ = prepare_batches(data, device)
        cost = _KLCost(model, batches, named, anchor_cache)
        setup_forward = cost.n_forward
        anchor = cost.anchor
        dim = anchor.numel()
        measure_obj = make_measure(measure, anchor, sigma=sigma, bounds=bounds)
        precond = None
        if preconditioner is not None:
            if not isinstance(preconditioner, torch.Tensor) or preconditioner.numel() != dim:
                raise ValueError(f"preconditioner must be a (D,) = ({dim},) tensor of positive values")
            precond = normalize_preconditioner(preconditioner).to(device)
        log_det_p = log_det(precond)

        indices = torch.arange(first_index, first_index + n_samples, dtype=torch.int64)
        stats_rows, mults, deltas, evals, forwards, seconds, status = [], [], [], [], [], [], []
        for i in indices.tolist():
            g = gaussian_directions(seed, [i], dim, device=device)
            stats_rows.append(stats_of_values(g, anchor, precond, measure_obj.weights, measure_obj.bounds))
            direction_started = time.perf_counter()
            u = g[0].double() / torch.linalg.vector_norm(g[0].double())
            v = (u if precond is None else u * precond.double()).to(anchor.dtype)  # tyche: P unit(g)
            forward_before = cost.n_forward
            outcome = faithful_search(
                lambda m, v=v: cost(anchor + m * v),
                eps,
                rtol=rtol,
                max_iters=max_iters,
                extra_calls=extra_calls,
            )
            seconds.append(time.perf_counter() - direction_started)
            forwards.append(cost.n_forward - forward_before)
            mults.append(outcome["mult"])
            deltas.append(outcome["delta"])
            evals.append(outcome["evals"])
            status.append(outcome["status"])
        stats = DirectionStats.from_tensor(torch.cat(stats_rows).cpu())
        props = stats.props
        multipliers = torch.tensor(mults, dtype=torch.float64)
        radii = multipliers * props  # |m v| = m |P u|
        estimates = measure_obj.log_ray_measures(radii, stats) - dim * torch.log(props) + log_det_p
    finally:
        for module, training in modes:
            module.training = training
    return {
        "indices": indices,
        "estimates": estimates,
        "radii": radii,
        "multipliers": multipliers,
        "props": props,
        "deltas": torch.tensor(deltas, dtype=torch.float64),
        "evals": torch.tensor(evals, dtype=torch.int64),
        "forward_passes": torch.tensor(forwards, dtype=torch.int64),
        "seconds": torch.tensor(seconds, dtype=torch.float64),
        "status": status,
        "log_volume": log_mean_exp(estimates),
        "dim": dim,
        "cutoff": eps,
        "seconds_total": time.perf_counter() - started,
        "setup_forward_passes": setup_forward,
        "config": {
            "seed": seed,
            "rtol": rtol,
            "max_iters": max_iters,
            "anchor_cache": anchor_cache,
            "extra_calls": extra_calls,
            "measure": measure_obj.describe(),
            "preconditioned": precond is not None,
        },
    }


__all__ = ["baseline_estimate", "faithful_search"]
