"""Hamiltonian Monte Carlo moves for the sequential estimator (``engine.sequential``).

Why HMC: the tempered laws are products of thousands of non-Gaussian factors (one per wide direction of
a network's neighborhood). A random-walk or pCN proposal from a Gaussian reference must shrink like
1/sqrt(D x mismatch) to be accepted and then barely moves (measured: per-axis variance collapsing to 5%
of the truth at D = 4,810 on the digits quartic); HMC follows the gradient and keeps its step near
D^(-1/4) of the reference scale (Neal 2011, "MCMC using Hamiltonian dynamics"; Beskos et al. 2013).

The potential is U = -log pi in the curvature's coordinates y (and the complement r beside them when the
curvature has rank k < D); the mass matrix is the inverse of a per-axis variance the sampler gives (the
other replicates' spread; the complement: the prior's sigma^2), so one step size serves narrow and wide
directions alike. Each leapfrog
step costs one evaluation of the cost and its gradient for the whole population; the Metropolis test on
the Hamiltonian makes the move exact for pi whatever the step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# A potential: (y, r) -> (U (R, N), dU/dy (R, N, k), dU/dr (R, N, D) or None, what to keep at the point)
Potential = Callable[[torch.Tensor, torch.Tensor | None], tuple]

_JITTER = 0.2  # each trajectory's step is the replicate's step times U(1 - jitter, 1 + jitter): no periodic orbits


def hmc_move(y, r, here, potential: Potential, *, inverse_mass, step, n_steps: int, generator,
             project=None, complement_variance: float = 1.0):
    """One HMC trajectory per particle from (y, r); returns (y', r', accepted (R, N) bool, kept').

    here: (U, dU/dy, dU/dr, kept) at (y, r), so the starting point costs nothing.
    inverse_mass: (R, k) per-replicate variances for y; r's is ``complement_variance`` (the prior's
    sigma^2), its momentum drawn through ``project`` (D-vectors -> their part in the complement).
    step: (R,) leapfrog step sizes in units of the reference's scale. Accepted particles take the end
    point; ``kept`` is whatever the potential returned there (the cost, the start density...).
    """
    m_inv = inverse_mass.unsqueeze(1)
    p = torch.randn(y.shape, generator=generator, dtype=torch.float64, device=y.device) / m_inv.sqrt()
    q = None
    if r is not None:
        noise = torch.randn(r.shape, generator=generator, dtype=torch.float64, device=r.device)
        q = project(noise) / math.sqrt(complement_variance)
    jitter = 1.0 + _JITTER * (2 * torch.rand(y.shape[:2], generator=generator, dtype=torch.float64, device=y.device) - 1)
    eps = (step.view(-1, 1) * jitter).unsqueeze(-1)
    sigma2 = None if r is None else complement_variance
    u0, gy, gr, _ = here
    h0 = u0 + _kinetic(p, q, m_inv, sigma2)
    drift = eps * m_inv  # (R, N, k): the position step per unit momentum, the same for the whole trajectory
    # p, q and the positions are this function's own arrays from here on: updated in place (fewer passes)
    p = p.addcmul_(eps, gy, value=-0.5)
    if q is not None:
        q = q.addcmul_(eps, gr, value=-0.5)
    y_new, r_new = y.clone(), None if r is None else r.clone()
    for k in range(n_steps):
        y_new.addcmul_(drift, p)
        if q is not None:
            r_new.addcmul_(eps, q, value=sigma2)
        u1, gy, gr, kept = potential(y_new, r_new)
        weight = -1.0 if k < n_steps - 1 else -0.5
        p.addcmul_(eps, torch.nan_to_num(gy, nan=0.0, posinf=0.0, neginf=0.0), value=weight)
        if q is not None:
            q.addcmul_(eps, torch.nan_to_num(gr, nan=0.0, posinf=0.0, neginf=0.0), value=weight)
    h1 = u1 + _kinetic(p, q, m_inv, sigma2)
    log_ratio = torch.nan_to_num(h0 - h1, nan=-math.inf)
    u = torch.rand(log_ratio.shape, generator=generator, dtype=torch.float64, device=y.device)
    accepted = torch.log(u) < log_ratio
    return y_new, r_new, accepted, (u1, gy, gr, kept)


def _kinetic(p, q, m_inv, sigma2) -> torch.Tensor:
    k = 0.5 * torch.linalg.vecdot(p * m_inv, p)
    if q is not None:
        k = k + 0.5 * sigma2 * torch.linalg.vecdot(q, q)
    return k


def value_and_gradient_by_autograd(fn: Callable[[torch.Tensor], torch.Tensor]):
    """(B, D) -> ((B,) costs, (B, D) gradients) of a cost written in differentiable torch operations."""

    def both(points: torch.Tensor):
        leaf = points.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            costs = torch.as_tensor(fn(leaf)).reshape(-1)
            if not costs.requires_grad:
                raise TypeError(
                    "kernel='hmc' needs the cost's gradient: fn's output does not depend differentiably on its input "
                    "(it ran under torch.no_grad, or left torch). Pass gradient=... (a (B, D) -> ((B,), (B, D)) "
                    "function), or kernel='pcn', which needs costs only"
                )
            (grad,) = torch.autograd.grad(costs.sum(), leaf)
        return costs.detach(), grad

    return both
