"""Which evaluator runs a model's probes (``evaluation=``), and building it."""

from __future__ import annotations

import torch

from localvol_fast.nn.costs.functional import FunctionalModelCost
from localvol_fast.nn.costs.inplace import InPlaceModelCost
from localvol_fast.nn.costs.plain_mlp import PlainMLPCost, plain_mlp_layers

EVALUATION_MODES = ("auto", "vmap", "sequential", "inplace")
INPLACE_MIN_PARAMETERS = 1 << 24  # from this many perturbed parameters "auto" evaluates in place


def default_evaluation(model, layout, device, use_vmap: bool) -> str:
    """vmap batches probes, which pays on a GPU and for plain MLPs (their factored path); on a CPU a
    generic model runs fastest one probe at a time written in place, as do large models anywhere."""
    if not use_vmap:
        return "sequential"
    if layout.dim >= INPLACE_MIN_PARAMETERS:
        return "inplace"
    run_device = torch.device(device) if device is not None else layout.params[0].device
    if run_device.type == "cpu" and plain_mlp_layers(model, layout) is None:
        return "inplace"
    return "vmap"


def make_cost(evaluation: str, model, batches, neighborhood, layout, backend, **options):
    """The evaluator for ``evaluation`` ("inplace", "vmap" or "sequential"); vmap on a plain MLP takes
    its factored fast path."""
    if evaluation == "inplace":
        return InPlaceModelCost(model, batches, neighborhood, layout, backend, **options)
    if evaluation == "vmap" and PlainMLPCost.supports(model, batches, layout):
        return PlainMLPCost(model, batches, neighborhood, layout, backend, **options)
    return FunctionalModelCost(model, batches, neighborhood, layout, backend, use_vmap=evaluation == "vmap", **options)
