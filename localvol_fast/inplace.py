"""Costs of large models: each probe is written into the model's own parameters, never stored apart.

For a probe theta0 + t w_hat the backend's ``perturb_`` kernel writes anchor + (t / |P g|) P g(seed, i)
into every perturbed parameter, regenerating the direction from (seed, index) on the fly. The values
are *written* from the kept anchor copy (not added and subtracted), so nothing drifts however many
probes run, and ``restore_weights`` puts the anchor back exactly. Memory stays at the model, one anchor
copy (in the parameters' own dtype), the activations of one forward pass and the anchor's cached
outputs (on the device, on the CPU, or recomputed: ``anchor_cache``); it does not grow with the number
of directions. One probe runs per forward pass.
"""

from __future__ import annotations

import torch

from .models import ModelCost


class InPlaceModelCost(ModelCost):
    """``ModelCost`` that writes probes into the model (module docstring); ``mode`` is "inplace"."""

    def __init__(self, model, batches, neighborhood, named_params, backend, **options):
        super().__init__(model, batches, neighborhood, named_params, backend, use_vmap=False, **options)
        self.mode = "inplace"
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self._written = None  # the (index, scale) whose probe the parameters hold, None for the anchor

    @torch.no_grad()
    def restore_weights(self) -> None:
        super().restore_weights()
        self._written = None

    @torch.no_grad()
    def _write_probe(self, index: torch.Tensor, scale: torch.Tensor) -> None:
        key = (int(index), float(scale))
        if self._written == key:
            return
        batch = self.batch
        for p, start in zip(self.params, self.offsets):
            n = p.numel()
            precond = None if batch.precond is None else batch.precond[start : start + n]
            self.backend.perturb_(p.detach().view(-1), self.anchor[start : start + n], precond, batch.seed, index, scale, start)
        self._written = key

    @torch.no_grad()
    def _cost_here(self, write=None) -> float:
        """C at the parameters' current values (``write()`` first puts the probe back when needed)."""
        total = 0.0
        for k, data_batch in enumerate(self.batches):
            cache = self.cache_of(k)  # may restore the anchor to recompute its outputs
            if write is not None:
                write()
            values = self.neighborhood.per_probe(self.forward_plain(data_batch), data_batch).unsqueeze(0)
            total += float(self.neighborhood.combine(values, cache, self.backend)[0])
            self.n_forward += 1
            self._written = None  # a model may write into its own weights: rewrite before the next batch
        return total / self.total_weight

    def anchor_cost(self, anchor: torch.Tensor) -> float:
        self.restore_weights()
        return self._cost_here()

    def __call__(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        device = self.anchor.device
        scales = (radii.double() * batch.inverse_norm[rows]).to(device)
        costs = torch.empty(rows.numel(), dtype=torch.float64)
        for j in range(rows.numel()):
            index = batch.indices[int(rows[j]) : int(rows[j]) + 1]
            scale = scales[j : j + 1]
            costs[j] = self._cost_here(lambda: self._write_probe(index, scale))
        if self.l2_reg:  # |theta - theta0| = t along a unit direction
            costs += 0.5 * self.l2_reg * radii.double() ** 2
        return costs
