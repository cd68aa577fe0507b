"""What the estimator asks of a cost: ``PointCost`` and the protocol every evaluator follows.

The estimator calls ``anchor_cost(anchor)`` once, ``start_batch(batch)`` with each ``DirectionBatch``,
and then ``evaluator(rows, radii)`` for the costs at theta0 + radii * w_hat[rows]. ``PointCost`` reaches
those costs through a function of whole parameter vectors; the ``nn`` layer's evaluators have cheaper
ways (factored MLP layers, writing probes into the model) behind the same three methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from localvol_fast.engine.directions import DirectionBatch


class PointCost:
    """Evaluates a cost of whole parameter vectors, ``fn((k, D) points) -> (k,)``, at the probes."""

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


def as_evaluator(fn):
    """``fn`` itself when it is an evaluator (has ``start_batch``), else a ``PointCost`` around it."""
    return fn if hasattr(fn, "start_batch") else PointCost(fn)
