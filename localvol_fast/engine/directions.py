"""Batches of directions w_hat = P g / |P g|, g = g(seed, index) the backend's Gaussian stream.

A diagonal P (a (D,) tensor) never stores its directions: the backend's kernels regenerate g. A dense P
(a ``core.preconditioners.MatrixPreconditioner``, D small enough to hold Q) mixes every coordinate of
g, which no kernel does, so its batch keeps P g (B, D) float64 from one matmul.
"""

from __future__ import annotations

import torch

from localvol_fast.core.measures import DirectionStats
from localvol_fast.ops.reference import stats_of_values


class DirectionBatch:
    """A batch of directions w_hat = P g / |P g|, never stored: the backend's kernels regenerate g.

    ``stats`` come from one pass of ``direction_stats``; ``points`` writes theta0 + r w_hat with
    ``perturb_`` as anchor + (r / |P g|) * P g.
    """

    diagonal = True  # evaluators with kernels of their own (in place, fused Triton) need a diagonal P

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


class DenseDirectionBatch(DirectionBatch):
    """``DirectionBatch`` of a dense P: the same g(seed, i) as every other path, P g by a float64 matmul,
    kept for the batch (B x D float64; D is bounded by ``core.preconditioners.MAX_DENSE_DIM``)."""

    diagonal = False

    def __init__(self, backend, seed: int, indices: torch.Tensor, anchor: torch.Tensor, precond, weights, bounds):
        self.backend, self.seed, self.precond, self.anchor = backend, seed, precond, anchor
        self.indices = indices.to(anchor.device)
        g = backend.gaussian(seed, self.indices, 0, anchor.numel())
        self.pg = precond.apply(g)
        # The statistics of P g are those of a diagonal run whose "g" is P g; only |g|^2 is g's own.
        stats = stats_of_values(self.pg, anchor, None, weights, bounds)
        stats[:, 0] = g.double().pow(2).sum(1)
        self.stats = DirectionStats.from_tensor(stats.to("cpu", torch.float64))
        self.inverse_norm = torch.rsqrt(self.stats.sq_norm_pg)

    def points(self, rows: torch.Tensor, radii: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """base + r w_hat for the given rows, computed in float64 (as ``perturb_`` does), in base's dtype."""
        base = self.anchor if base is None else base
        scales = (radii.double() * self.inverse_norm[rows]).to(self.pg.device)
        values = base.double().reshape(1, -1) + scales.reshape(-1, 1) * self.pg[rows.to(self.pg.device)]
        return values.to(base.dtype)
