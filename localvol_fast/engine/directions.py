"""A batch of directions w_hat = P g / |P g|, never stored: the backend's kernels regenerate g from (seed, index)."""

from __future__ import annotations

import torch

from localvol_fast.core.measures import DirectionStats


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
