"""``estimate``: the local volume of an ``nn.Module`` (a classifier, a Hugging Face causal LM) on its data.

The perturbed parameters are the model's trainable floating-point parameters (or the named subset
``params``), flattened in ``named_parameters()`` order into the anchor theta0 (D,) (``parameters``).
Probes are evaluated by one of the evaluators of ``costs`` (functionally, several per forward pass
through ``vmap`` where the model allows it; a plain MLP through its factored layers; or written into
the model's own weights for large models); the model's weights, buffers and train/eval modes are
restored exactly afterwards, also after an exception, KeyboardInterrupt or SIGTERM (``preservation``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from localvol_fast.core.checks import (
    check_anchor, check_choice, check_cutoffs, check_device, check_diagonal_size, check_flag, check_integer,
    check_number,
)
from localvol_fast.core.measures import anchor_rms, check_measure
from localvol_fast.core.preconditioners import MatrixPreconditioner
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.estimator import run_estimate
from localvol_fast.engine.journal import fingerprint_tensors
from localvol_fast.engine.options import RunOptions
from localvol_fast.engine.sequential import SCOPES, check_start_cutoff
from localvol_fast.engine.sequential_result import SequentialResult
from localvol_fast.nn.auto_eps import choose_preconditioner_eps
from localvol_fast.nn.costs.anchor_cache import ANCHOR_CACHE_MODES
from localvol_fast.nn.costs.choice import EVALUATION_MODES, default_evaluation, make_cost
from localvol_fast.nn.data import check_token_ids, prepare_batches
from localvol_fast.nn.neighborhoods import make_neighborhood
from localvol_fast.nn.parameters import ParameterLayout, check_one_device, select_parameters, skipped_parameter_note
from localvol_fast.nn.preconditioners import PRECONDITIONER_NAMES, preconditioner_family
from localvol_fast.nn.preservation import preserved_model
from localvol_fast.nn.sequential import check_curvature_option, run_sequential, surrogate_curvature
from localvol_fast.ops import get_backend

AUTO_EPS = "auto"  # preconditioner_eps: choose it on pilot directions (``auto_eps``)
METHODS = ("rays", "sequential")


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
    preconditioner_eps: float | str = 1e-5,
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
    method: str = "rays",
    scope: str = "local",
    curvature="auto",
    n_replicates: int = 4,
    moves_per_step: int = 6,
    start_cutoff: float | None = None,
    max_evaluations: int | None = None,
) -> VolumeResult | SequentialResult:
    """Estimate the local volume of ``model`` around its current weights, in nats.

    data: a tensor of inputs, an (inputs, targets) pair, an iterable/DataLoader of batches (also the
        [inputs] lists of a DataLoader(TensorDataset(x))), or for language models a dict / BatchEncoding
        with input_ids and attention_mask (padding is ignored). NaN/inf in floating-point inputs, a mask
        of another shape than its ids, and token ids outside the model's vocabulary (its input embedding's
        size, else config.vocab_size) are ValueErrors naming the batch and position, before any forward pass.
    neighborhood: "kl" (mean KL(anchor || perturbed) over examples / non-padding tokens; the anchor's
        log-probabilities are computed once) or "loss" (loss_fn(outputs, targets) - its anchor value).
    measure, sigma, bounds, seed, rtol, batch_size: as in ``estimate_volume``; sigma=None means the RMS
        of the perturbed parameters (pass the initialization scale when known, as the paper does).
    preconditioner: None, "adam" (with optimizer= a torch Adam/AdamW or its state_dict), "fisher"
        (diagonal Fisher of the output distribution at the anchor from ``fisher_passes`` backward passes
        with labels sampled from the anchor's own predictions), or a (D,) torch tensor (a numpy array or
        list is refused with a TypeError: convert it with torch.as_tensor, choosing dtype and device).
    preconditioner_exponent, preconditioner_eps: p_i = 1 / (v_i^exponent + eps) of a named preconditioner.
        preconditioner_eps="auto" picks eps from the paper's grid {1e1, ..., 1e-5} by the median estimate
        of 64 pilot directions of another seed (``nn.auto_eps``), then estimates with fresh directions of
        ``seed``; result.info["preconditioner"]["eps_choice"] holds the choice and the pilot's figures.
    params: names (or a predicate(name, param)) of the parameters to perturb; this sets D.
    device: where to run (default: the model's device), one that exists here ("meta" is refused); the
        data is moved there with a note.
    l2_reg: adds l2_reg / 2 * |theta - theta0|^2 to the cost (the reference package's ``l2_reg``); finite, >= 0.
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
    memory_budget: bytes the anchor cache may take on the device, a number > 0 (default: a quarter of the
        free GPU memory on CUDA, unlimited on the CPU). data_batch_size: rows per forward pass of a tensor
        input (a positive int, or None for 4096).
    output, resume: a JSON-lines journal of finished directions, and continuing the run it holds
        (see ``estimate_volume``). distributed: shard directions over torch.distributed ranks (torchrun);
        each rank must hold the same model and data (on its own device).
    method: "rays" (the paper's estimator: n_samples directions from the anchor, each searched for the
        radius where the cost reaches the cutoff; a lower bound in expectation, see the README's accuracy
        section) or "sequential" (tempered sequential Monte Carlo, ``engine.sequential``: consistent, with an
        interval from n_replicates populations of n_samples particles, moved by HMC on the model's
        gradients (``nn.costs.gradients``); returns one
        ``SequentialResult`` for every cutoff asked, with the whole volume-vs-cutoff curve it passed).
        n_samples is the number of directions (rays) or of particles per replicate (sequential: 100 is
        the default for both; the accuracy benchmark uses 200 particles).
    scope, curvature, n_replicates, moves_per_step, start_cutoff, max_evaluations: the sequential method's options. scope "local" (start
        from the anchor's quadratic surrogate; the anchor's own basin) or "global" (start from the prior: the
        probability that a prior draw lands in ANY such basin, as far as the sampler finds them).
        curvature: the surrogate's Hessian, "auto", "fisher-eigen", "diag-h", "fisher" (``nn.sequential``),
        a (D,) tensor or an (eigenvalues, vectors) pair. moves_per_step: HMC moves after each step (default 6); more
        cost proportionally more and shrink the population's lag, a bias low the interval does not show
        (measured: about -1 nat with 2 and -0.2 with 6, README's accuracy section). start_cutoff (local
        scope): start from the surrogate's neighborhood at this larger cutoff (None: the cutoff itself) and
        temper down from there; a bent neighborhood, which the quadratic surrogate does not follow, needs
        it (measured: on a 2-D banana 0.45 nats low without, within its interval at 100 x the cutoff; on
        the digits MLP a start at 10 x found 230 nats more volume, README's accuracy section).
        max_evaluations: stop early (result.complete False).
        The sequential method takes the Gaussian measure with a scalar sigma, no preconditioner and no
        distributed run; output/resume keep its latest state in the file named by output.
    Every option is checked here (type, range, finiteness) before the model is moved or run: a bad one is
    a TypeError or ValueError naming it and its value. sigma and bounds must lie in [1e-150, 1e150]
    (their squares stay normal float64); n_samples must fit the machine's memory (about 256 bytes per
    direction and cutoff) and be below 2**31.
    Returns a ``VolumeResult``; ``result.info`` holds timings, forward counts and the preconditioner's cost.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # Every option is checked here, before the model is moved or run: a bad value never costs a forward pass.
    method = check_choice(method, METHODS, "method")
    if method == "sequential":
        sequential = _checked_sequential_options(
            scope, curvature, n_replicates, moves_per_step, start_cutoff, max_evaluations, measure, sigma,
            preconditioner, distributed, cutoff,
        )
    options = RunOptions.checked(
        cutoff=cutoff, n_samples=n_samples, seed=seed, rtol=rtol, batch_size=batch_size, progress=progress,
        output=output, resume=resume, distributed=distributed,
    )
    device = check_device(device)
    l2_reg, memory_budget, data_batch_size = _checked_sizes(l2_reg, memory_budget, data_batch_size)
    fisher_passes, preconditioner_exponent, preconditioner_eps = _checked_preconditioner_options(
        preconditioner, optimizer, fisher_passes, preconditioner_exponent, preconditioner_eps
    )
    use_vmap = check_flag(use_vmap, "use_vmap")
    nb = make_neighborhood(neighborhood, loss_fn)
    if not list(model.parameters()):
        raise ValueError("the model has no parameters to perturb")
    check_choice(evaluation, EVALUATION_MODES, "evaluation")
    check_choice(anchor_cache, ANCHOR_CACHE_MODES, "anchor_cache")
    started = time.perf_counter()
    layout = ParameterLayout(select_parameters(model, params))
    check_measure(measure, layout.dim, sigma=sigma, bounds=bounds)  # the options that need D
    if isinstance(preconditioner, torch.Tensor):
        check_diagonal_size(preconditioner, layout.dim)
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
            if method == "sequential":
                run = functools.partial(_run_info, nb, l2_reg, model, layout, batches, cost) if output is not None else None
                result, precond_info = _sequential_result(
                    cost, options, sigma, fisher_passes, sequential, model, layout, batches, run_info_of=run,
                )
                return _finished(result, notes, started, cost, precond_info, nb, l2_reg, model)
            family, precond_info = preconditioner_family(
                preconditioner, optimizer, model, layout, cost.anchor_forward, batches,
                exponent=preconditioner_exponent, passes=fisher_passes, seed=options.seed,
            )
            run_pilot = functools.partial(
                _pilot_run, cost, options, ops, {"measure": measure, "sigma": sigma, "bounds": bounds}
            )
            precond, precond_info = _at_eps(family, precond_info, preconditioner_eps, run_pilot, options.seed)
            # Only a journal reads it: the data's fingerprint costs a pass over the data.
            run_info = _run_info(nb, l2_reg, model, layout, batches, cost, precond_info) if output is not None else None
            result = run_estimate(
                cost, cost.anchor, options, measure=measure, sigma=sigma, bounds=bounds, preconditioner=precond,
                backend=ops, run_info=run_info,
            )
        finally:
            if anchor is not None:
                layout.write(anchor)
    return _finished(result, notes, started, cost, precond_info, nb, l2_reg, model)


def _sequential_result(cost, options, sigma, fisher_passes, sequential: dict, model, layout, batches, *, run_info_of):
    """The sequential method's run: the surrogate's curvature at the anchor, then the sampler (``nn.sequential``)."""
    curvature = sequential.pop("curvature")
    value, curvature_info = surrogate_curvature(
        curvature, model, layout, cost.anchor_forward, batches, passes=fisher_passes, seed=options.seed,
    )
    precond_info = {"name": "sequential", "curvature": curvature_info}
    run_info = None if run_info_of is None else run_info_of(precond_info)
    sigma = sigma if sigma is not None else anchor_rms(cost.anchor)
    return run_sequential(cost, options, sigma=sigma, curvature=value, run_info=run_info, **sequential), precond_info


def _finished(result, notes, started, cost, precond_info, nb, l2_reg, model):
    """The result(s) with the model layer's notes and figures added."""
    if cost.fallback_reason:
        notes.append(f"vmap was not usable for this model ({cost.fallback_reason}); probes ran one at a time")
    for r in result if isinstance(result, list) else [result]:
        _describe(r, notes, started, cost, precond_info, nb, l2_reg, model)
    return result


def _checked_sequential_options(scope, curvature, n_replicates, moves_per_step, start_cutoff, max_evaluations, measure,
                                sigma, preconditioner, distributed, cutoff) -> dict:
    """The sequential method's own options, and the ray options it cannot take (refused, not ignored)."""
    check_choice(scope, SCOPES, "scope")
    check_curvature_option(curvature)
    n_replicates = check_integer(n_replicates, "n_replicates", what="independent populations (>= 2 for an interval)")
    moves_per_step = check_integer(moves_per_step, "moves_per_step", what="HMC moves after each step")
    if max_evaluations is not None:
        max_evaluations = check_integer(max_evaluations, "max_evaluations", what="cost evaluations, or None")
    if start_cutoff is not None:
        start_cutoff = check_start_cutoff(start_cutoff, check_cutoffs(cutoff), scope)
    if preconditioner is not None:
        raise ValueError(
            "method='sequential' takes no preconditioner (that shapes the ray method's directions); give its "
            f"surrogate's Hessian as curvature= instead (got preconditioner={preconditioner!r})"
        )
    if measure != "gaussian" or not (sigma is None or isinstance(sigma, (int, float)) and not isinstance(sigma, bool)):
        raise ValueError(
            f"method='sequential' supports the Gaussian measure with a scalar sigma (or None), got measure={measure!r}, "
            f"sigma of type {type(sigma).__name__}; use method='rays' for other measures"
        )
    if distributed:
        raise ValueError("method='sequential' does not shard over torch.distributed ranks; run it on one process")
    return {"scope": scope, "curvature": curvature, "n_replicates": n_replicates, "moves_per_step": moves_per_step,
            "start_cutoff": start_cutoff, "max_evaluations": max_evaluations}


def check_resolution(cost, cutoff: float) -> None:
    """Refuse cutoffs below what the cost can resolve: float32 rounding in the KL sum gives noise of
    about 1e-7 times the anchor's mean entropy-like sum_v p |log p|, which a tiny cutoff drowns in."""
    floor = getattr(cost, "noise_floor", 0.0)
    if cutoff < floor:
        raise ValueError(
            f"cutoff {cutoff!r} is below what this cost resolves: its float32 rounding noise is about {floor:.2g} "
            f"nats, so cutoffs under {floor:.2g} would measure noise; use a larger cutoff"
        )


def _checked_preconditioner_options(preconditioner, optimizer, fisher_passes, exponent, eps) -> tuple:
    """The preconditioner's kind and its pairing with optimizer=, fisher_passes, the exponent and eps."""
    _check_preconditioner_kind(preconditioner, optimizer)
    fisher_passes = check_integer(fisher_passes, "fisher_passes", what="backward passes for the Fisher diagonal")
    exponent = check_number(
        exponent, "preconditioner_exponent", minimum=0, inclusive=False, what="p_i = 1 / (v_i^exponent + eps)"
    )
    return fisher_passes, exponent, _checked_preconditioner_eps(eps, preconditioner)  # eps after the kind


def _checked_preconditioner_eps(eps, preconditioner):
    """A number >= 0, or "auto" for a named preconditioner (a tensor or None has no eps to choose)."""
    if isinstance(eps, str) and eps == AUTO_EPS:
        if not isinstance(preconditioner, str):
            kind = "None (isotropic)" if preconditioner is None else f"a {type(preconditioner).__name__}"
            raise ValueError(
                f"preconditioner_eps='auto' chooses the eps of a named preconditioner (e.g. 'adam', 'fisher'), "
                f"but preconditioner is {kind}, which has no eps; pass a number or a named preconditioner"
            )
        return eps
    return check_number(
        eps, "preconditioner_eps", minimum=0, what="p_i = 1 / (v_i^exponent + eps)",
        hint="pass a number >= 0, or 'auto' to choose it on pilot directions",
    )


def _at_eps(family, info: dict, eps, run_pilot, seed) -> tuple:
    """The preconditioner at the given eps, or at the one ``choose_preconditioner_eps`` picks on pilot
    directions (eps "auto"); the eps, the choice and the pilot's figures go into the preconditioner's info."""
    if eps != AUTO_EPS:
        return family(eps), info if "exponent" not in info else {**info, "eps": eps}
    resolved = {}  # the chosen eps's preconditioner is reused for the run, not recomputed

    def at(e):
        resolved[e] = family(e)
        return resolved[e]

    chosen, choice = choose_preconditioner_eps(at, run_pilot, seed=seed)
    return resolved[chosen], {**info, "eps": chosen, "eps_choice": choice}


def _pilot_run(cost, options, ops, measure_options, preconditioner, n_directions, seed):
    """A pilot estimate on the run's own cost (its anchor outputs are cached once for all runs), at the
    smallest cutoff, without journal or progress bar: only the directions and the preconditioner differ."""
    pilot_options = dataclasses.replace(
        options, cutoffs=(options.smallest_cutoff,), returns_list=False, n_samples=n_directions, seed=seed,
        output=None, resume=False, progress=False,
    )
    # Its warnings (e.g. "k of 64 directions unbounded") are about directions the user never asked for:
    # they are kept as status counts in the pilot's figures instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_estimate(cost, cost.anchor, pilot_options, preconditioner=preconditioner, backend=ops, **measure_options)


def _checked_sizes(l2_reg, memory_budget, data_batch_size) -> tuple:
    """l2_reg (finite, >= 0), memory_budget (None or bytes > 0), data_batch_size (None or rows > 0)."""
    l2_reg = check_number(l2_reg, "l2_reg", minimum=0, what="the penalty l2_reg / 2 * |theta - theta0|^2")
    if memory_budget is not None:
        memory_budget = check_number(
            memory_budget, "memory_budget", minimum=0, inclusive=False, what="bytes for the anchor cache on the device",
            hint="pass a number of bytes, e.g. 2**30 for 1 GiB, or None",
        )
    if data_batch_size is not None:
        data_batch_size = check_integer(data_batch_size, "data_batch_size", what="rows per forward pass, or None")
    return l2_reg, memory_budget, data_batch_size


def _check_preconditioner_kind(preconditioner, optimizer) -> None:
    """preconditioner: None, a name, a torch tensor or a dense ``MatrixPreconditioner`` (``Eigenbasis``;
    sizes are checked once D is known), and optimizer= exactly with 'adam'. A numpy array or list is
    refused, as ``estimate_volume`` does."""
    if isinstance(preconditioner, (torch.Tensor, MatrixPreconditioner)):
        pass
    elif isinstance(preconditioner, str):
        check_choice(preconditioner, PRECONDITIONER_NAMES, "preconditioner")
    elif preconditioner is not None:
        raise TypeError(
            f"preconditioner must be None, one of {', '.join(map(repr, PRECONDITIONER_NAMES))}, an Eigenbasis or a (D,) "
            f"torch.Tensor, got {type(preconditioner).__name__}; convert an array with torch.as_tensor(...)"
        )
    if isinstance(preconditioner, str) and preconditioner == "adam":
        if optimizer is None:
            raise ValueError("preconditioner='adam' needs optimizer= (a torch Adam/AdamW or its state_dict())")
        is_state = isinstance(optimizer, Mapping) and "state" in optimizer and "param_groups" in optimizer
        if not (isinstance(optimizer, torch.optim.Optimizer) or is_state):
            got = f"a dict with keys {sorted(map(str, optimizer))}" if isinstance(optimizer, Mapping) else type(optimizer).__name__
            raise TypeError(
                "optimizer must be a torch Adam/AdamW or its state_dict() (a dict with 'state' and 'param_groups'), "
                f"got {got}"
            )
    elif optimizer is not None:
        raise ValueError("optimizer= is used by preconditioner='adam'; pass preconditioner='adam' or drop it")


def _vocabulary_size(model) -> int | None:
    """How many token ids the model's input embedding takes (Hugging Face models), or None if unknown."""
    embeddings = None
    if callable(getattr(model, "get_input_embeddings", None)):
        try:
            embeddings = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
    if isinstance(embeddings, torch.nn.Embedding):
        return embeddings.num_embeddings
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _batches_and_notes(model, data, layout, data_batch_size) -> tuple[list, list[str]]:
    """The evaluation batches on the run device, and the notes for the user (data moved, parameters skipped)."""
    batches, notes = prepare_batches(data, layout.params[0].device, data_batch_size)
    vocab = _vocabulary_size(model)
    if vocab is not None:  # before any forward pass: an id past the embedding is an indexing error there
        check_token_ids(batches, vocab)
    skipped = skipped_parameter_note(model)
    if skipped:
        notes.append(skipped)
        warnings.warn(skipped, stacklevel=4)
    return batches, notes


def _run_info(nb, l2_reg, model, layout, batches, cost, precond_info) -> dict:
    """What, beyond the engine's own options, a resumed run must match: the cost (neighborhood, loss,
    penalty), the model's parameters and every tensor of the data."""
    loss_fn = getattr(nb, "loss_fn", None)
    loss_name = None if loss_fn is None else getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return {
        "neighborhood": nb.name,
        "loss_fn": None if loss_fn is None else f"{getattr(loss_fn, '__module__', '')}.{loss_name}",
        "l2_reg": l2_reg,
        "model": type(model).__name__,
        "parameters": layout.names,
        "data_rows": [b.n_rows for b in batches],
        "data": fingerprint_tensors([t for b in batches for t in b.tensors()]),
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
