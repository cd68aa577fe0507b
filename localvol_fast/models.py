"""``estimate``: the local volume of an ``nn.Module`` (a classifier, a Hugging Face causal LM) on its data.

The perturbed parameters are the model's trainable floating-point parameters (or the named subset
``params``), flattened in ``named_parameters()`` order into the anchor theta0 (D,). A batch of parameter
vectors is evaluated with ``torch.func.functional_call``, several probes per forward pass through
``vmap`` where the model allows it, else one at a time; both give the same costs. The model's own
weights are never written during a run, and its weights, buffers and train/eval modes are restored
exactly afterwards, also after an exception or KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, vmap

from .data import Batch, prepare_batches
from .fisher import fisher_diagonal
from .neighborhoods import make_neighborhood
from .ops import get_backend
from .preconditioners import adam_preconditioner, normalize_preconditioner
from .result import VolumeResult
from .volume import PointCost, check_anchor, check_cutoffs, estimate_volume

_PROBE_ELEMENTS = 1 << 25  # bound on probes x output elements in one vmapped forward
ANCHOR_CACHE_MODES = ("auto", "device", "cpu", "recompute")
INPLACE_MIN_PARAMETERS = 1 << 24  # from this many perturbed parameters "auto" evaluates in place
RESOLUTION_FACTOR = 1.0  # a cutoff must exceed the bound on the cost's rounding noise


def select_parameters(model: torch.nn.Module, params=None) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs to perturb: trainable floating-point ones, optionally restricted.

    params: None (all), a list of names, or a predicate ``params(name, parameter) -> bool``.
    Integer/complex parameters and frozen ones (requires_grad=False) are never perturbed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if params is not None:
        if callable(params):
            named = [(n, p) for n, p in named if params(n, p)]
        else:
            wanted = [params] if isinstance(params, str) else list(params)
            available = dict(named)
            missing = [n for n in wanted if n not in available]
            if missing:
                raise ValueError(
                    f"params names {missing} are not trainable floating-point parameters of the model; "
                    f"available: {list(available)[:10]}{' ...' if len(available) > 10 else ''}"
                )
            named = [(n, available[n]) for n in dict.fromkeys(wanted)]
    if not named:
        raise ValueError(
            "the model has no trainable floating-point parameters to perturb"
            + (" among the selected params" if params is not None else "")
        )
    return named


def skipped_parameter_note(model: torch.nn.Module) -> str | None:
    """A note naming the trainable parameters that are not floating point (never perturbed), if any."""
    skipped = [f"{n} ({p.dtype})" for n, p in model.named_parameters() if not p.is_floating_point()]
    if not skipped:
        return None
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"parameters that are not floating point are not perturbed: {', '.join(skipped[:5])}{more}"


def check_one_device(named) -> None:
    """The perturbed parameters must share one device (move the model with ``device=``)."""
    devices = {}
    for name, p in named:
        devices.setdefault(str(p.device), name)
    if len(devices) > 1:
        listing = ", ".join(f"{n!r} on {d}" for d, n in devices.items())
        raise ValueError(
            f"the perturbed parameters are on several devices ({listing}); pass device= to run the whole model on "
            "one device, or restrict params= to the parameters of one device"
        )


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module, device=None, restored_elsewhere=()):
    """Run in eval mode (on ``device``), then restore weights, buffers, modes and devices exactly.

    ``restored_elsewhere``: names of parameters the caller restores itself (from its anchor copy), so
    that no second full copy of a large model is kept here. Restoring never hides the exception that
    ended the run.
    """
    modes = [(m, m.training) for m in model.modules()]
    skip = set(restored_elsewhere)
    state = model.state_dict(keep_vars=True)
    saved = {k: v.detach().clone() for k, v in state.items() if k not in skip and v.device.type != "meta"}
    homes = {k: v.device for k, v in state.items()}
    moved = device is not None and any(v.device != torch.device(device) for v in state.values())
    try:
        if moved:
            model.to(device)
        model.eval()
        yield model
    finally:
        try:
            with torch.no_grad():
                for name, value in model.state_dict(keep_vars=True).items():
                    if moved and value.device != homes[name]:  # each tensor back to its own device
                        value.data = value.data.to(homes[name])
                    if name in saved and not torch.equal(value.detach(), saved[name].to(value.device)):
                        value.detach().copy_(saved[name].to(value.device))
        finally:
            for module, training in modes:
                module.training = training


def anchor_copy(named_params) -> torch.Tensor:
    """The flat anchor theta0: one copy of the perturbed parameters, in their (promoted) dtype."""
    dtype = named_params[0][1].dtype
    for _, p in named_params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.cat([p.detach().reshape(-1).to(dtype) for _, p in named_params])


@torch.no_grad()
def write_anchor(params, anchor: torch.Tensor) -> None:
    """Write the anchor back into the perturbed parameters (exact: the anchor is a copy of them)."""
    offset = 0
    for p in params:
        p.copy_(anchor[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


class ModelCost(PointCost):
    """C(theta) of ``model`` on fixed batches for (k, D) parameter vectors: ``costs(thetas) -> (k,)``.

    The anchor's outputs are computed once per batch and cached by the neighborhood.
    """

    def __init__(
        self,
        model,
        batches: list[Batch],
        neighborhood,
        named_params,
        backend,
        use_vmap: bool = True,
        l2_reg: float = 0.0,
        anchor_cache: str = "auto",
        memory_budget: float | None = None,
        anchor: torch.Tensor | None = None,
    ):
        super().__init__(self._model_costs)
        self.model, self.batches, self.neighborhood, self.backend = model, batches, neighborhood, backend
        self.l2_reg = float(l2_reg)
        self.params = [p for _, p in named_params]
        self.names = [n for n, _ in named_params]
        self.shapes = [p.shape for _, p in named_params]
        self.dtypes = [p.dtype for _, p in named_params]
        self.numels = [p.numel() for _, p in named_params]
        self.anchor = anchor_copy(named_params) if anchor is None else anchor
        self.dim = self.anchor.numel()
        accepts = inspect.signature(model.forward).parameters
        self._add_positions = "position_ids" in accepts
        if anchor_cache not in ANCHOR_CACHE_MODES:
            raise ValueError(f"anchor_cache must be one of {ANCHOR_CACHE_MODES}, got {anchor_cache!r}")
        self.anchor_cache = anchor_cache
        self.memory_budget, self._cache_bytes = _cache_budget(memory_budget, self.anchor.device), 0
        with torch.no_grad():
            self.caches = [self._stored(neighborhood.prepare(self.anchor_forward(b), b)) for b in batches]
        self.total_weight = sum(c["weight"] for c in self.caches)
        self.noise_floor = sum(c.get("noise", 0.0) for c in self.caches) / max(self.total_weight, 1.0)
        if not self.total_weight > 0:
            raise ValueError("the evaluation data has no unmasked position (every attention_mask entry is 0)")
        self.mode = "vmap" if use_vmap else "sequential"
        self.fallback_reason = None
        largest = max(c.get("elements", 1) for c in self.caches)
        self.probe_chunk = max(1, _PROBE_ELEMENTS // max(largest, 1))
        self.n_forward = 0

    def _stored(self, cache: dict) -> dict:
        """Keep the anchor's outputs where ``anchor_cache`` says: on the device, on the CPU, or not at all;
        "auto" keeps them on the device while they fit in the memory budget, the rest on the CPU."""
        if "log_probs" not in cache:
            return cache
        size = cache["log_probs"].numel() * cache["log_probs"].element_size()
        if self.anchor_cache == "recompute":
            del cache["log_probs"]
        elif self.anchor_cache == "cpu" or (self.anchor_cache == "auto" and self._cache_bytes + size > self.memory_budget):
            cache["log_probs"] = cache["log_probs"].cpu()
        else:
            self._cache_bytes += size
        return cache

    def cache_of(self, k: int) -> dict:
        """Batch k's anchor cache on the run device (recomputed from the anchor's weights if not kept)."""
        cache = self.caches[k]
        if "elements" not in cache:  # only the KL neighborhood caches outputs
            return cache
        if "log_probs" in cache:
            if cache["log_probs"].device == self.anchor.device:
                return cache
            return {**cache, "log_probs": cache["log_probs"].to(self.anchor.device, non_blocking=True)}
        # Only the log-probabilities: prepare's scalar figures would make the host wait for the device.
        log_probs = self.neighborhood.anchor_log_probs(self.anchor_forward(self.batches[k]))
        self.n_forward += 1
        return {**cache, "log_probs": log_probs}

    def cache_placement(self) -> str:
        """Where the anchor's outputs ended up: "device", "cpu", "device+cpu", "recompute" or "none"."""
        places = {str(c["log_probs"].device.type) if "log_probs" in c else "recompute" for c in self.caches if "elements" in c}
        device = self.anchor.device.type
        names = sorted({"device" if p == device else p for p in places})
        return "+".join(names) if names else "none"

    def restore_weights(self) -> None:
        write_anchor(self.params, self.anchor)

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

    def params_of(self, theta: torch.Tensor) -> dict:
        """Split (..., D) vectors into {name: (..., *shape)} views in each parameter's dtype."""
        lead = theta.shape[:-1]
        out, offset = {}, 0
        for name, shape, dtype, n in zip(self.names, self.shapes, self.dtypes, self.numels):
            out[name] = theta[..., offset : offset + n].reshape(*lead, *shape).to(dtype)
            offset += n
        return out

    def _fresh(self, thetas: torch.Tensor) -> torch.Tensor:
        """With several data batches each gets its own copy of the probes: a model that writes into its
        weights during a forward pass must not change the probe the next batch sees."""
        return thetas.clone() if len(self.batches) > 1 else thetas

    def _per_probe(self, params: dict, batch: Batch):
        outputs = functional_call(self.model, params, batch.args, self._kwargs(batch))
        return self.neighborhood.per_probe(outputs, batch)

    def _costs_vmap(self, thetas: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        for k, batch in enumerate(self.batches):
            cache = self.cache_of(k)
            one = lambda params: self._per_probe(params, batch)  # noqa: E731
            for lo in range(0, thetas.shape[0], self.probe_chunk):
                chunk = self._fresh(thetas[lo : lo + self.probe_chunk])
                values = vmap(one, randomness="same")(self.params_of(chunk))
                total[lo : lo + chunk.shape[0]] += self.neighborhood.combine(values, cache, self.backend)
                self.n_forward += 1
        return total

    def _costs_sequential(self, thetas: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        for j in range(thetas.shape[0]):
            for k, batch in enumerate(self.batches):
                values = self._per_probe(self.params_of(self._fresh(thetas[j])), batch).unsqueeze(0)
                total[j] += self.neighborhood.combine(values, self.cache_of(k), self.backend)[0]
                self.n_forward += 1
        return total

    @torch.no_grad()
    def _model_costs(self, thetas: torch.Tensor) -> torch.Tensor:
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
        if self.l2_reg:
            step = thetas.double() - self.anchor.double()
            costs = costs + 0.5 * self.l2_reg * (step * step).sum(-1)
        return costs


def selected_optimizer_state(optimizer, model, named_params):
    """An Adam state_dict restricted to the selected parameters, checked against their shapes."""
    all_params = list(model.parameters())
    position = {id(p): k for k, p in enumerate(all_params)}
    ids = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(ids) != len(all_params):
        raise ValueError(
            f"the optimizer state_dict covers {len(ids)} parameters but the model has {len(all_params)}; "
            "pass the optimizer (or state_dict) created for this model's parameters"
        )
    state, chosen = {}, []
    for name, p in named_params:
        sid = ids[position[id(p)]]
        entry = optimizer["state"].get(sid)
        if entry is None or "exp_avg_sq" not in entry:
            raise ValueError(f"the optimizer state has no moments for parameter {name!r}; take it after a step")
        if tuple(entry["exp_avg_sq"].shape) != tuple(p.shape):
            raise ValueError(
                f"the optimizer state for {name!r} has shape {tuple(entry['exp_avg_sq'].shape)} but the parameter "
                f"has {tuple(p.shape)}: the optimizer belongs to other parameters"
            )
        state[sid] = entry
        chosen.append(sid)
    return {"state": state, "param_groups": [{"params": chosen}]}


EVALUATION_MODES = ("auto", "vmap", "sequential", "inplace")


def check_resolution(cost, cutoff) -> None:
    """Refuse cutoffs below what the cost can resolve: float32 rounding in the KL sum gives noise of
    about 1e-7 times the anchor's mean entropy-like sum_v p |log p|, which a tiny cutoff drowns in."""
    floor = getattr(cost, "noise_floor", 0.0)
    smallest = min(check_cutoffs(cutoff))
    if smallest < RESOLUTION_FACTOR * floor:
        raise ValueError(
            f"cutoff {smallest!r} is below what this cost resolves: its float32 rounding noise is about {floor:.2g} "
            f"nats, so cutoffs under {RESOLUTION_FACTOR * floor:.2g} would measure noise; use a larger cutoff"
        )


def _default_evaluation(model, named, dim: int, device, use_vmap: bool) -> str:
    """vmap batches probes, which pays on a GPU and for plain MLPs (their factored path); on a CPU a
    generic model runs fastest one probe at a time written in place, as do large models anywhere."""
    if not use_vmap:
        return "sequential"
    if dim >= INPLACE_MIN_PARAMETERS:
        return "inplace"
    from .fast_mlp import _plain_mlp_layers

    run_device = torch.device(device) if device is not None else named[0][1].device
    if run_device.type == "cpu" and _plain_mlp_layers(model, named) is None:
        return "inplace"
    return "vmap"


def _cache_budget(memory_budget, device) -> float:
    """Bytes the anchor's outputs may take on the device: a quarter of free GPU memory by default."""
    if memory_budget is not None:
        if not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        return float(memory_budget)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 4
    return float("inf")


def _make_cost(evaluation, model, batches, neighborhood, named, ops, **options):
    if evaluation == "inplace":
        from .inplace import InPlaceModelCost

        return InPlaceModelCost(model, batches, neighborhood, named, ops, **options)
    if evaluation == "vmap":
        from .fast_mlp import SequentialMLPCost

        if SequentialMLPCost.supports(model, batches, named):
            return SequentialMLPCost(model, batches, neighborhood, named, ops, **options)
    return ModelCost(model, batches, neighborhood, named, ops, use_vmap=evaluation == "vmap", **options)


def resolve_preconditioner(preconditioner, optimizer, model, named_params, forward, batches, *, exponent, eps, passes, seed):
    """The (D,) preconditioner tensor (or None) for ``estimate``, and what it cost."""
    if preconditioner is None:
        if optimizer is not None:
            raise ValueError("optimizer= is used by preconditioner='adam'; pass preconditioner='adam' or drop it")
        return None, {"name": "isotropic"}
    params = [p for _, p in named_params]
    dim = sum(p.numel() for p in params)
    if isinstance(preconditioner, torch.Tensor):
        if preconditioner.numel() != dim:
            raise ValueError(f"preconditioner has {preconditioner.numel()} values but D = {dim}")
        return normalize_preconditioner(preconditioner), {"name": "user"}
    if preconditioner == "adam":
        if optimizer is None:
            raise ValueError("preconditioner='adam' needs optimizer= (a torch Adam/AdamW or its state_dict())")
        if isinstance(optimizer, torch.optim.Optimizer):
            source = optimizer
            missing = [n for n, p in named_params if not optimizer.state.get(p)]
            if missing:
                raise ValueError(
                    f"the optimizer has no state for parameters {missing[:5]}: it optimizes other parameters "
                    "or has not taken a step yet"
                )
        else:
            source = selected_optimizer_state(optimizer, model, named_params)
        p = adam_preconditioner(source, params=params, exponent=exponent, eps=eps)
        return p.to(params[0].device), {"name": "adam", "exponent": exponent, "eps": eps}
    if preconditioner == "fisher":
        started = time.perf_counter()
        diagonal, n_backward = fisher_diagonal(forward, params, batches, passes=passes, seed=seed)
        p = normalize_preconditioner(1.0 / (diagonal.double().pow(exponent) + eps), name="fisher preconditioner")
        info = {"name": "fisher", "exponent": exponent, "eps": eps, "backward_passes": n_backward}
        info["seconds"] = time.perf_counter() - started
        return p.to(params[0].device), info
    raise ValueError(f"preconditioner must be None, 'adam', 'fisher' or a (D,) tensor, got {preconditioner!r}")


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
    nb = make_neighborhood(neighborhood, loss_fn)
    check_cutoffs(cutoff)
    if not list(model.parameters()):
        raise ValueError("the model has no parameters to perturb")
    if evaluation not in EVALUATION_MODES:
        raise ValueError(f"evaluation must be one of {EVALUATION_MODES}, got {evaluation!r}")
    started = time.perf_counter()
    named = select_parameters(model, params)
    dim = sum(p.numel() for _, p in named)
    if evaluation == "auto":
        evaluation = _default_evaluation(model, named, dim, device, use_vmap)
    in_place = evaluation == "inplace"
    anchor = None
    name_of = {id(p): n for n, p in model.named_parameters()}
    with preserved_model(model, device, restored_elsewhere=[name_of[id(p)] for _, p in named] if in_place else ()):
        try:
            named = select_parameters(model, params)  # the same parameters, now on the run device
            check_one_device(named)
            anchor = anchor_copy(named)  # before anything runs the model, which may change its weights
            run_device = named[0][1].device
            batches, notes = prepare_batches(data, run_device, data_batch_size)
            skipped = skipped_parameter_note(model)
            if skipped:
                notes.append(skipped)
                warnings.warn(skipped, stacklevel=3)
            ops = get_backend(backend, run_device)
            cost = _make_cost(
                evaluation, model, batches, nb, named, ops,
                l2_reg=l2_reg, anchor_cache=anchor_cache, memory_budget=memory_budget, anchor=anchor,
            )
            check_anchor(cost.anchor)  # before any preconditioner is computed from it
            check_resolution(cost, cutoff)
            precond, precond_info = resolve_preconditioner(
                preconditioner,
                optimizer,
                model,
                named,
                cost.anchor_forward,
                batches,
                exponent=preconditioner_exponent,
                eps=preconditioner_eps,
                passes=fisher_passes,
                seed=seed,
            )
            result = estimate_volume(
                cost,
                cost.anchor,
                cutoff=cutoff,
                n_samples=n_samples,
                measure=measure,
                sigma=sigma,
                bounds=bounds,
                preconditioner=precond,
                seed=seed,
                rtol=rtol,
                batch_size=batch_size,
                progress=progress,
                backend=ops.name,
                output=output,
                resume=resume,
                distributed=distributed,
                run_info={
                    "neighborhood": nb.name,
                    "l2_reg": l2_reg,
                    "model": type(model).__name__,
                    "parameters": [n for n, _ in named],
                    "data_rows": [b.n_rows for b in batches],
                    "evaluation": cost.mode,
                    "preconditioner_kind": precond_info["name"],
                },
            )
        finally:
            if anchor is not None:
                write_anchor([p for _, p in named], anchor)
    if cost.fallback_reason:
        notes.append(f"vmap was not usable for this model ({cost.fallback_reason}); probes ran one at a time")
    for r in result if isinstance(result, list) else [result]:
        r.info["notes"] = r.info.get("notes", []) + notes
        r.info.update(
            seconds_total=time.perf_counter() - started,
            forward_passes=cost.n_forward,
            evaluation=cost.mode,
            anchor_cache=cost.cache_placement(),
            preconditioner=precond_info,
        )
        r.config.update(
            neighborhood=nb.name + ("+l2" if l2_reg else ""),
            parameters=cost.names if len(cost.names) <= 64 else len(cost.names),
            model=type(model).__name__,
        )
    return result

