"""``ModelCost``: what every evaluator of a model's neighborhood cost shares.

C(theta) of ``model`` on fixed data batches, for probes theta0 + r w_hat along the estimator's
directions (the ``PointCost`` protocol of ``engine.evaluation``). Subclasses differ in how a probe
reaches the model: functionally (``functional``), through per-direction factors (``plain_mlp``) or
written into the model's own weights (``inplace``).
"""

from __future__ import annotations

import inspect

import torch

from localvol_fast.engine.evaluation import PointCost
from localvol_fast.nn.costs.anchor_cache import AnchorCache
from localvol_fast.nn.data import Batch
from localvol_fast.nn.parameters import ParameterLayout


class ModelCost(PointCost):
    """The model, its data, the neighborhood, the flat layout of the perturbed parameters, the anchor
    theta0 (one copy, in the parameters' dtype) and the anchor's cached outputs.

    ``n_forward`` counts the forward passes over one data batch that evaluations made.
    """

    mode = "model"

    def __init__(
        self,
        model,
        batches: list[Batch],
        neighborhood,
        layout: ParameterLayout,
        backend,
        *,
        l2_reg: float = 0.0,
        anchor_cache: str = "auto",
        memory_budget: float | None = None,
        anchor: torch.Tensor | None = None,
    ):
        super().__init__(self.costs_of_points)
        self.model, self.batches, self.neighborhood, self.backend = model, batches, neighborhood, backend
        self.layout, self.l2_reg = layout, float(l2_reg)
        self.anchor = layout.flatten() if anchor is None else anchor
        self.dim = self.anchor.numel()
        self._add_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.probe_forwards = 0
        self.anchor_outputs = AnchorCache(
            neighborhood, batches, self.anchor_forward, self.anchor.device, anchor_cache, memory_budget
        )
        self.total_weight = self.anchor_outputs.total_weight
        self.noise_floor = self.anchor_outputs.noise_floor
        self.fallback_reason = None

    @property
    def n_forward(self) -> int:
        return self.probe_forwards + self.anchor_outputs.recomputed

    @property
    def names(self) -> list[str]:
        return self.layout.names

    def costs_of_points(self, thetas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} evaluates probes along directions only")

    def cache_of(self, k: int) -> dict:
        return self.anchor_outputs[k]

    def cache_placement(self) -> str:
        return self.anchor_outputs.placement()

    def restore_weights(self) -> None:
        self.layout.write(self.anchor)

    def _kwargs(self, batch: Batch) -> dict:
        kwargs = dict(batch.kwargs)
        if self._add_positions and batch.mask is not None and "position_ids" not in kwargs:
            # Positions count real tokens only, so left padding shifts nothing.
            kwargs["position_ids"] = (batch.mask.long().cumsum(-1) - 1).clamp_min(0)
        return kwargs

    def forward_plain(self, batch: Batch):
        return self.model(*batch.args, **self._kwargs(batch))

    def anchor_forward(self, batch: Batch):
        """The model's outputs at the anchor (its weights are written back first: a model may change them)."""
        self.restore_weights()
        return self.forward_plain(batch)

    def with_l2_along_rays(self, costs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """costs + l2_reg / 2 * |theta - theta0|^2, where |theta - theta0| = t along a unit direction."""
        if not self.l2_reg:
            return costs
        return costs + 0.5 * self.l2_reg * steps**2

    def with_l2_at_points(self, costs: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        """costs + l2_reg / 2 * |theta - theta0|^2 for whole parameter vectors thetas (k, D)."""
        if not self.l2_reg:
            return costs
        step = thetas.double() - self.anchor.double()
        return costs + 0.5 * self.l2_reg * (step * step).sum(-1)
