"""Costs and their gradients at whole parameter vectors: what the sequential method's HMC moves need.

``PointGradients(cost)(thetas (k, D)) -> (costs (k,), gradients (k, D))``, float64, for any ``ModelCost``:
the probes reach the model functionally (``torch.func.functional_call`` under ``vmap``, several per
forward pass), so the model's own weights are never written, and one backward pass gives every probe's
gradient. The neighborhood is combined through the pure-PyTorch reference backend: the compiled kernels
have no backward. A model that vmap cannot batch is evaluated one probe at a time (same numbers).
"""

from __future__ import annotations

import torch
from torch.func import vmap

from localvol_fast.nn.costs.functional import PROBE_ELEMENTS, probe_outputs, substitution_names
from localvol_fast.ops import get_backend


class PointGradients:
    """The gradient companion of a ``ModelCost``: same model, data, neighborhood, anchor cache and L2 term."""

    def __init__(self, cost):
        self.cost = cost
        self.substitutions = substitution_names(cost.model, cost.layout)
        self.backend = get_backend("reference")
        self.chunk = max(1, PROBE_ELEMENTS // max(cost.anchor_outputs.largest_elements, 1))
        self.use_vmap = True
        self.fallback_reason = None

    def _outputs(self, params: dict, batch):
        return probe_outputs(self.cost, self.substitutions, params, batch)

    def _chunk_cost(self, leaf: torch.Tensor, k: int, batch) -> torch.Tensor:
        """Summed-over-positions cost of each probe in ``leaf`` (c, D) on data batch k, differentiable."""
        cache = self.cost.cache_of(k)
        if self.use_vmap:
            values = vmap(lambda params: self._outputs(params, batch), randomness="same")(self.cost.layout.split(leaf))
        else:
            values = torch.stack([self._outputs(self.cost.layout.split(row), batch) for row in leaf])
        return self.cost.neighborhood.combine(values, cache, self.backend)

    def _costs_and_gradients(self, thetas: torch.Tensor):
        costs = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        grads = torch.zeros(thetas.shape, dtype=torch.float64, device=thetas.device)
        for lo in range(0, thetas.shape[0], self.chunk):
            leaf = thetas[lo : lo + self.chunk].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                total = sum(self._chunk_cost(leaf, k, batch) for k, batch in enumerate(self.cost.batches))
                (grad,) = torch.autograd.grad(total.sum(), leaf)
            costs[lo : lo + leaf.shape[0]] = total.detach()
            grads[lo : lo + leaf.shape[0]] = grad.double()
            self.cost.probe_forwards += len(self.cost.batches)
        return costs / self.cost.total_weight, grads / self.cost.total_weight

    def __call__(self, thetas: torch.Tensor):
        thetas = thetas.to(self.cost.anchor.device, self.cost.anchor.dtype)
        try:
            costs, grads = self._costs_and_gradients(thetas)
        except Exception as error:  # noqa: BLE001 - any vmap failure means: one probe at a time
            if not self.use_vmap:
                raise
            self.use_vmap = False
            self.fallback_reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            costs, grads = self._costs_and_gradients(thetas)
        if self.cost.l2_reg:  # the gradient of ModelCost.with_l2_at_points' l2 / 2 |theta - theta0|^2
            grads = grads + self.cost.l2_reg * (thetas.double() - self.cost.anchor.double())
        return self.cost.with_l2_at_points(costs, thetas), grads
