"""``estimate``: the local volume of an ``nn.Module`` (a classifier, a Hugging Face causal LM) on its data.

The perturbed parameters are the model's trainable floating-point parameters (or the named subset
``params``), flattened in ``named_parameters()`` order into the anchor theta0 (D,) (``parameters``).
Probes are evaluated by one of the evaluators of ``costs`` (functionally, several per forward pass
through ``vmap`` where the model allows it; a plain MLP through its factored layers; or written into
the model's own weights for large models); the model's weights, buffers and train/eval modes are
restored exactly afterwards, also after an exception or KeyboardInterrupt (``preservation``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import torch

from localvol_fast.core.checks import check_anchor, check_choice
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.estimator import run_estimate
from localvol_fast.engine.options import RunOptions
from localvol_fast.nn.costs.anchor_cache import ANCHOR_CACHE_MODES
from localvol_fast.nn.costs.choice import EVALUATION_MODES, default_evaluation, make_cost
from localvol_fast.nn.data import prepare_batches
from localvol_fast.nn.neighborhoods import make_neighborhood
from localvol_fast.nn.parameters import ParameterLayout, check_one_device, select_parameters, skipped_parameter_note
from localvol_fast.nn.preconditioners import resolve_preconditioner
from localvol_fast.nn.preservation import preserved_model
from localvol_fast.ops import get_backend


def estimate(
    model: torch.nn.Module,
    data,
    *,
    neighborhood: str = "kl",
    loss_fn: Callable | None = None,
    cutoff: float = 1e-2,
    n_samples: int = 100,
    measure: str = "gaussian",
    sigma=None,
    bounds=None,
    preconditioner=None,
    optimizer=None,
    params: Sequence[str] | Callable | None = None,
    seed: int = 0,
    rtol: float = 1e-2,
    batch_size: int | None = None,
    progress: bool = True,
    device=None,
    preconditioner_exponent: float = 0.5,
    preconditioner_eps: float = 1e-5,
    fisher_passes: int = 16,
    use_vmap: bool = True,
    backend: str = "auto",
    l2_reg: float = 0.0,
    evaluation: str = "auto",
    anchor_cache: str = "auto",
    memory_budget: float | None = None,
    data_batch_size: int | None = None,
    output=None,
    resume: bool = False,
    distributed: bool = False,
) -> VolumeResult:
    """Estimate the local volume of ``model`` around its current weights, in nats.

    data: a tensor of inputs, an (inputs, targets) pair, an iterable/DataLoader of batches, or for
        language models a dict / BatchEncoding with input_ids and attention_mask (padding is ignored).
    neighborhood: "kl" (mean KL(anchor || perturbed) over examples / non-padding tokens; the anchor's
        log-probabilities are computed once) or "loss" (loss_fn(outputs, targets) - its anchor value).
    measure, sigma, bounds, seed, rtol, batch_size: as in ``estimate_volume``; sigma=None means the RMS
        of the perturbed parameters (pass the initialization scale when known, as the paper does).
    preconditioner: None, "adam" (with optimizer= a torch Adam/AdamW or its state_dict), "fisher"
        (diagonal Fisher of the output distribution at the anchor from ``fisher_passes`` backward passes
        with labels sampled from the anchor's own predictions), or a (D,) tensor.
    params: names (or a predicate(name, param)) of the parameters to perturb; this sets D.
    device: where to run (default: the model's device); the data is moved there with a note.
    l2_reg: adds l2_reg / 2 * |theta - theta0|^2 to the cost (the reference package's ``l2_reg``).
    backend: the kernels of the inner loop ("auto", "reference", "cpu", "cuda", "triton"; see
        ``localvol_fast.available_backends()``); every backend gives the same directions.
    cutoff: eps, or a list of cutoffs searched together (a list of results comes back, one per cutoff).
    evaluation: how probes run: "vmap" (several per forward pass; a plain MLP gets its factored fast path),
        "sequential" (one at a time, functionally), "inplace" (written into the model's own weights from
        one anchor copy: for large models, memory independent of n_samples), or "auto": in place from
        16.8 M perturbed parameters and for models other than plain MLPs on a CPU, else vmap
        (use_vmap=False means sequential).
    anchor_cache: where the anchor's outputs are kept: "device", "cpu", "recompute" (an extra forward
        per evaluation), or "auto" (the device when they fit in the memory budget, else the CPU).
    memory_budget: bytes the anchor cache may take on the device (default: a quarter of the free GPU
        memory on CUDA, unlimited on the CPU). data_batch_size: rows per forward pass of a tensor input.
    output, resume: a JSON-lines journal of finished directions, and continuing the run it holds
        (see ``estimate_volume``). distributed: shard directions over torch.distributed ranks (torchrun);
        each rank must hold the same model and data (on its own device).
    Returns a ``VolumeResult``; ``result.info`` holds timings, forward counts and the preconditioner's cost.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = RunOptions.checked(
        cutoff=cutoff, n_samples=n_samples, seed=seed, rtol=rtol, batch_size=batch_size, progress=progress,
        output=output, resume=resume, distributed=distributed,
    )
    nb = make_neighborhood(neighborhood, loss_fn)
    if not list(model.parameters()):
        raise ValueError("the model has no parameters to perturb")
    check_choice(evaluation, EVALUATION_MODES, "evaluation")
    check_choice(anchor_cache, ANCHOR_CACHE_MODES, "anchor_cache")
    started = time.perf_counter()
    layout = ParameterLayout(select_parameters(model, params))
    if evaluation == "auto":
        evaluation = default_evaluation(model, layout, device, use_vmap)
    name_of = {id(p): n for n, p in model.named_parameters()}
    restored_here = [name_of[id(p)] for p in layout.params] if evaluation == "inplace" else ()
    anchor = None
    with preserved_model(model, device, restored_elsewhere=restored_here):
        try:
            layout = ParameterLayout(select_parameters(model, params))  # the same parameters, now on the run device
            check_one_device(zip(layout.names, layout.params))
            anchor = layout.flatten()  # before anything runs the model, which may change its weights
            batches, notes = _batches_and_notes(model, data, layout, data_batch_size)
            ops = get_backend(backend, anchor.device)
            cost = make_cost(
                evaluation, model, batches, nb, layout, ops,
                l2_reg=l2_reg, anchor_cache=anchor_cache, memory_budget=memory_budget, anchor=anchor,
            )
            check_anchor(cost.anchor)  # before any preconditioner is computed from it
            check_resolution(cost, options.smallest_cutoff)
            precond, precond_info = resolve_preconditioner(
                preconditioner, optimizer, model, layout, cost.anchor_forward, batches,
                exponent=preconditioner_exponent, eps=preconditioner_eps, passes=fisher_passes, seed=options.seed,
            )
            run_info = _run_info(nb, l2_reg, model, layout, batches, cost, precond_info)
            result = run_estimate(
                cost, cost.anchor, options, measure=measure, sigma=sigma, bounds=bounds, preconditioner=precond,
                backend=ops, run_info=run_info,
            )
        finally:
            if anchor is not None:
                layout.write(anchor)
    if cost.fallback_reason:
        notes.append(f"vmap was not usable for this model ({cost.fallback_reason}); probes ran one at a time")
    for r in result if isinstance(result, list) else [result]:
        _describe(r, notes, started, cost, precond_info, nb, l2_reg, model)
    return result


def check_resolution(cost, cutoff: float) -> None:
    """Refuse cutoffs below what the cost can resolve: float32 rounding in the KL sum gives noise of
    about 1e-7 times the anchor's mean entropy-like sum_v p |log p|, which a tiny cutoff drowns in."""
    floor = getattr(cost, "noise_floor", 0.0)
    if cutoff < floor:
        raise ValueError(
            f"cutoff {cutoff!r} is below what this cost resolves: its float32 rounding noise is about {floor:.2g} "
            f"nats, so cutoffs under {floor:.2g} would measure noise; use a larger cutoff"
        )


def _batches_and_notes(model, data, layout, data_batch_size) -> tuple[list, list[str]]:
    """The evaluation batches on the run device, and the notes for the user (data moved, parameters skipped)."""
    batches, notes = prepare_batches(data, layout.params[0].device, data_batch_size)
    skipped = skipped_parameter_note(model)
    if skipped:
        notes.append(skipped)
        warnings.warn(skipped, stacklevel=4)
    return batches, notes


def _run_info(nb, l2_reg, model, layout, batches, cost, precond_info) -> dict:
    """What, beyond the engine's own options, a resumed run must match."""
    return {
        "neighborhood": nb.name,
        "l2_reg": l2_reg,
        "model": type(model).__name__,
        "parameters": layout.names,
        "data_rows": [b.n_rows for b in batches],
        "evaluation": cost.mode,
        "preconditioner_kind": precond_info["name"],
    }


def _describe(result, notes, started, cost, precond_info, nb, l2_reg, model) -> None:
    """The model layer's part of ``result.info`` and ``result.config``."""
    result.info["notes"] = result.info.get("notes", []) + notes
    result.info.update(
        seconds_total=time.perf_counter() - started,
        forward_passes=cost.n_forward,
        evaluation=cost.mode,
        anchor_cache=cost.cache_placement(),
        preconditioner=precond_info,
    )
    result.config.update(
        neighborhood=nb.name + ("+l2" if l2_reg else ""),
        parameters=cost.names if len(cost.names) <= 64 else len(cost.names),
        model=type(model).__name__,
    )
