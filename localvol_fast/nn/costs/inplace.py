"""Costs of large models: each probe is written into the model's own parameters, never stored apart.

For a probe theta0 + t w_hat the backend's ``perturb_`` kernel writes anchor + (t / |P g|) P g(seed, i)
into every perturbed parameter, regenerating the direction from (seed, index) on the fly. The values
are *written* from the kept anchor copy (not added and subtracted), so nothing drifts however many
probes run, and ``restore_weights`` puts the anchor back exactly. Memory stays at the model, one anchor
copy (in the parameters' own dtype), the activations of one forward pass and the anchor's cached
outputs (on the device, on the CPU, or recomputed: ``anchor_cache``); it does not grow with the number
of directions. One probe runs per forward pass. A dense (non-diagonal) preconditioner has no such
kernel; its probes come whole from the direction batch (D is small for those) and are written as they are.
"""

from __future__ import annotations

import functools

import torch

from localvol_fast.nn.costs.base import ModelCost


class InPlaceModelCost(ModelCost):
    """``ModelCost`` that writes probes into the model (module docstring); ``mode`` is "inplace"."""

    mode = "inplace"

    def __init__(self, *args, **options):
        self._scratch: dict[int, torch.Tensor] = {}  # per non-contiguous parameter (``_flat_target``)
        super().__init__(*args, **options)

    @torch.no_grad()
    def _write_probe(self, index: torch.Tensor, scale: torch.Tensor) -> None:
        batch = self.batch
        for p, start, stop in self.layout.spans():
            precond = None if batch.precond is None else batch.precond[start:stop]
            target = self._flat_target(p)
            self.backend.perturb_(target, self.anchor[start:stop], precond, batch.seed, index, scale, start)
            if not p.is_contiguous():
                p.copy_(target.view(p.shape))  # through p's own strides, in the layout's row-major order

    def _flat_target(self, p: torch.Tensor) -> torch.Tensor:
        """Where ``perturb_`` writes p's probe values: p's own memory when it is contiguous, else a
        contiguous scratch copied into p afterwards (a transposed parameter has no flat view)."""
        if p.is_contiguous():
            return p.detach().view(-1)
        scratch = self._scratch.get(id(p))
        if scratch is None:
            scratch = self._scratch[id(p)] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return scratch

    @torch.no_grad()
    def _cost_here(self, write=None) -> torch.Tensor:
        """C at the parameters' current values, a float64 scalar on the device. ``write()`` puts the probe
        in before every data batch: recomputing the anchor's outputs restores the anchor, and a model may
        write into its own weights during a forward pass."""
        total = torch.zeros((), dtype=torch.float64, device=self.anchor.device)
        for k, data_batch in enumerate(self.batches):
            cache = self.cache_of(k)  # may restore the anchor to recompute its outputs
            if write is not None:
                write()
            values = self.neighborhood.per_probe(self.forward_plain(data_batch), data_batch).unsqueeze(0)
            total += self.neighborhood.combine(values, cache, self.backend)[0]
            self.probe_forwards += 1
        return total / self.total_weight

    def anchor_cost(self, anchor: torch.Tensor) -> float:
        self.restore_weights()
        return float(self._cost_here())

    def costs_of_points(self, thetas: torch.Tensor) -> torch.Tensor:
        """Costs (k,) of whole parameter vectors (the sequential method's particles), each written into the
        model in turn; the anchor is written back afterwards."""
        thetas = thetas.to(self.anchor.device)
        costs = torch.empty(thetas.shape[0], dtype=torch.float64, device=self.anchor.device)
        try:
            for j in range(thetas.shape[0]):
                costs[j] = self._cost_here(functools.partial(self.layout.write, thetas[j]))
        finally:
            self.restore_weights()
        return self.with_l2_at_points(costs, thetas)

    def __call__(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """Costs (k,) on the device; nothing in here waits for the device."""
        device = self.anchor.device
        # Host values go over before any work is queued (a copy from pageable memory may wait for it).
        if self.batch.diagonal:
            indices, scales = self.batch.probe_arguments(rows, radii)
            writes = [functools.partial(self._write_probe, indices[j : j + 1], scales[j : j + 1]) for j in range(rows.numel())]
        else:  # a dense P has no kernel: its batch gives the probes (k x D, D is small), written as they are
            points = self.batch.points(rows, radii)
            writes = [functools.partial(self.layout.write, points[j]) for j in range(rows.numel())]
        steps = radii.to(device, torch.float64, non_blocking=True) if self.l2_reg else None
        costs = torch.empty(rows.numel(), dtype=torch.float64, device=device)
        for j, write in enumerate(writes):
            costs[j] = self._cost_here(write)
        return self.with_l2_along_rays(costs, steps)
