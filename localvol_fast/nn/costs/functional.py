"""Probes evaluated functionally (``torch.func.functional_call``): the model's own weights are never written.

"vmap" runs several probes per forward pass through ``torch.func.vmap``; "sequential" one at a time.
Both give the same costs; a model that vmap cannot batch falls back to "sequential" (with a note).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from localvol_fast.nn.costs.base import ModelCost
from localvol_fast.nn.data import Batch

PROBE_ELEMENTS = 1 << 25  # bound on probes x output elements in one vmapped forward


def substitution_names(model, layout) -> dict[str, list[str]]:
    """For each perturbed parameter, the names under which ``functional_call`` must put its probe value:
    one per (module, attribute) slot that holds it. A module used twice (the same ``nn.Linear`` twice in
    a ``Sequential``) has two names but one slot; torch's ``tie_weights`` would swap that slot twice and
    restore it to the first probe value (leaving an escaped tensor in the model), so each slot gets
    exactly one name and a weight tied between two modules gets one name per module."""
    owner = {id(p): name for name, p in zip(layout.names, layout.params)}
    names: dict[str, list[str]] = {name: [] for name in layout.names}
    slots = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or id(p) not in owner or (id(module), attr) in slots:
                continue
            slots.add((id(module), attr))
            names[owner[id(p)]].append(f"{prefix}.{attr}" if prefix else attr)
    return names


def probe_outputs(cost: ModelCost, substitutions: dict[str, list[str]], params: dict, batch: Batch):
    """The neighborhood's per-probe value of ``cost.model`` run with ``params`` (name -> tensor) in place of
    its perturbed parameters, through ``functional_call`` (``substitutions``: ``substitution_names``)."""
    slots = {alias: params[name] for name, aliases in substitutions.items() for alias in aliases}
    # tie_weights=False: the slots are already complete and distinct (substitution_names).
    outputs = functional_call(cost.model, slots, batch.args, cost._kwargs(batch), tie_weights=False)
    return cost.neighborhood.per_probe(outputs, batch)


class FunctionalModelCost(ModelCost):
    """``ModelCost`` of whole parameter vectors: ``costs_of_points(thetas (k, D)) -> (k,)``."""

    def __init__(self, model, batches, neighborhood, layout, backend, *, use_vmap: bool = True, **options):
        super().__init__(model, batches, neighborhood, layout, backend, **options)
        self.mode = "vmap" if use_vmap else "sequential"
        self.probe_chunk = max(1, PROBE_ELEMENTS // max(self.anchor_outputs.largest_elements, 1))
        self.substitutions = substitution_names(model, layout)

    def _fresh(self, thetas: torch.Tensor) -> torch.Tensor:
        """With several data batches each gets its own copy of the probes: a model that writes into its
        weights during a forward pass must not change the probe the next batch sees."""
        return thetas.clone() if len(self.batches) > 1 else thetas

    def _per_probe(self, params: dict, batch: Batch):
        return probe_outputs(self, self.substitutions, params, batch)

    def _costs_vmap(self, thetas: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        for k, batch in enumerate(self.batches):
            cache = self.cache_of(k)
            one = lambda params: self._per_probe(params, batch)  # noqa: E731
            for lo in range(0, thetas.shape[0], self.probe_chunk):
                chunk = self._fresh(thetas[lo : lo + self.probe_chunk])
                values = vmap(one, randomness="same")(self.layout.split(chunk))
                total[lo : lo + chunk.shape[0]] += self.neighborhood.combine(values, cache, self.backend)
                self.probe_forwards += 1
        return total

    def _costs_sequential(self, thetas: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        for j in range(thetas.shape[0]):
            for k, batch in enumerate(self.batches):
                values = self._per_probe(self.layout.split(self._fresh(thetas[j])), batch).unsqueeze(0)
                total[j] += self.neighborhood.combine(values, self.cache_of(k), self.backend)[0]
                self.probe_forwards += 1
        return total

    @torch.no_grad()
    def costs_of_points(self, thetas: torch.Tensor) -> torch.Tensor:
        thetas = thetas.to(self.anchor.device)
        costs = None
        if self.mode == "vmap":
            try:
                costs = self._costs_vmap(thetas) / self.total_weight
            except Exception as error:  # noqa: BLE001 - any vmap failure means: evaluate one at a time
                self.mode = "sequential"
                self.fallback_reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if costs is None:
            costs = self._costs_sequential(thetas) / self.total_weight
        return self.with_l2_at_points(costs, thetas)
