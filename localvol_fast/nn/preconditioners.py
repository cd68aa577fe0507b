"""The preconditioners ``estimate`` builds from a model: Adam's moments (from an optimizer or its
``state_dict``), the sampled diagonal Fisher, the exact output Fisher's diagonal ("diag-h") or eigenbasis
("hessian-eigen", small D), or a user's (D,) tensor or ``Eigenbasis`` (MATH.md, "Importance-sampled directions")."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from localvol_fast.core.preconditioners import (
    MatrixPreconditioner, check_dense_size, inverse_power_preconditioner, normalize_preconditioner,
)
from localvol_fast.nn.curvature import eigen_decomposition, output_fisher_diagonal, output_fisher_matrix, spectrum_eigenbasis
from localvol_fast.nn.fisher import fisher_diagonal
from localvol_fast.nn.hesscale import hesscale_diagonal

# "diag-h" and "hessian-eigen": the KL's exact Hessian at the anchor (the output Fisher), the paper's
# diag(H) and full-Hessian rows; the second needs D small enough for a dense D x D matrix.
PRECONDITIONER_NAMES = ("adam", "fisher", "diag-h", "hesscale", "hessian-eigen")


def _moments_from_state(state: Mapping, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(
            f"the optimizer state of {where} has no {key!r}; take the optimizer after at least one step "
            f"(found keys {sorted(state)})"
        )
    return state[key].detach().reshape(-1)


def _adam_moments(source, params, key: str) -> torch.Tensor:
    """The flat (D,) moment ``key`` of an Adam/AdamW instance or state_dict, in parameter order."""
    if isinstance(source, torch.optim.Optimizer):
        if params is None:
            params = [p for group in source.param_groups for p in group["params"]]
        pieces = []
        for k, p in enumerate(params):
            state = source.state.get(p)
            if not state:
                raise ValueError(
                    f"the optimizer has no state for parameter {k} (shape {tuple(p.shape)}): it does not "
                    "optimize these parameters or has not taken a step yet"
                )
            moments = _moments_from_state(state, key, f"parameter {k}")
            if state[key].shape != p.shape:
                raise ValueError(
                    f"the optimizer's {key} for parameter {k} has shape {tuple(state[key].shape)} but the parameter has "
                    f"{tuple(p.shape)}: the optimizer belongs to other parameters"
                )
            pieces.append(moments)
        return torch.cat(pieces)
    if isinstance(source, Mapping) and "state" in source and "param_groups" in source:
        ids = [i for group in source["param_groups"] for i in group["params"]]
        if params is not None and len(params) != len(ids):
            raise ValueError(
                f"the optimizer state_dict holds {len(ids)} parameters but {len(params)} were given; "
                "it belongs to other parameters"
            )
        pieces = []
        for k, i in enumerate(ids):
            if i not in source["state"]:
                raise ValueError(f"the optimizer state_dict has no state for parameter id {i}; take it after a step")
            state = source["state"][i]
            moments = _moments_from_state(state, key, f"parameter id {i}")
            # The k-th id of the param groups is the k-th parameter the optimizer was built with.
            if params is not None and state[key].shape != params[k].shape:
                raise ValueError(
                    f"the optimizer state_dict's {key} of parameter id {i} has shape {tuple(state[key].shape)} but "
                    f"parameter {k} has {tuple(params[k].shape)}: it belongs to other parameters, or they are "
                    "given in another order than the optimizer was built with"
                )
            pieces.append(moments)
        return torch.cat(pieces)
    raise TypeError(
        "source must be a torch.optim.Adam/AdamW instance, its state_dict(), or a tensor of second moments; "
        f"got {type(source).__name__}"
    )


def adam_preconditioner(
    source,
    params: Sequence[torch.Tensor] | None = None,
    exponent: float = 0.5,
    eps: float = 1e-5,
    moment: int = 2,
) -> torch.Tensor:
    """The paper's Adam preconditioner p_i = 1 / (v_i^exponent + eps), normalized to det P = 1.

    source: a ``torch.optim.Adam``/``AdamW`` (state taken for ``params``, default all its parameters
    in group order), its ``state_dict()``, or a tensor of moments v (any shape, flattened).
    moment: 2 uses the second moment ``exp_avg_sq`` (the paper's choice), 1 uses |exp_avg|.
    Returns a (D,) tensor.
    """
    if moment not in (1, 2):
        raise ValueError(f"moment must be 1 (exp_avg) or 2 (exp_avg_sq), got {moment!r}")
    if isinstance(source, torch.Tensor):
        v = source.detach().reshape(-1)
    else:
        v = _adam_moments(source, params, "exp_avg_sq" if moment == 2 else "exp_avg")
    dtype = torch.float32 if v.dtype == torch.float32 else torch.float64
    # Normalized in float64 (raw values may not fit float32), then kept in the moments' precision.
    p = inverse_power_preconditioner(v, exponent=exponent, eps=eps, name="adam preconditioner", source="optimizer moments")
    return p.to(dtype)


def state_ids(optimizer: Mapping, model) -> dict[int, int]:
    """{id(parameter): its id in an optimizer ``state_dict``}. A state_dict's ids number the parameters
    of its param groups in the order the optimizer was built with, which it does not record. It is known
    when the groups name their parameters (an optimizer built from ``model.named_parameters()``), or for
    one group, taken as ``Adam(model.parameters())``; several unnamed groups (layers listed in another
    order, weight-decay groups) could be in any order, so they are refused rather than guessed."""
    groups = optimizer["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    named = list(model.named_parameters())
    if groups and all("param_names" in group for group in groups):
        by_name = dict(zip((n for group in groups for n in group["param_names"]), ids))
        return {id(p): by_name[n] for n, p in named if n in by_name}
    if len(groups) > 1:
        raise ValueError(
            f"the optimizer state_dict has {len(groups)} param groups that do not name their parameters, so "
            "which state belongs to which parameter depends on how the groups were listed; pass the live "
            "optimizer (matched by identity), or build it from model.named_parameters() (its state_dict then "
            "names them)"
        )
    if len(ids) != len(named):
        raise ValueError(
            f"the optimizer state_dict covers {len(ids)} parameters but the model has {len(named)}; "
            "pass the optimizer (or state_dict) created for this model's parameters"
        )
    return {id(p): sid for (_, p), sid in zip(named, ids)}


def selected_optimizer_state(optimizer, model, named_params):
    """An Adam state_dict restricted to the selected parameters (matched by ``state_ids``), in their
    order, each checked against its parameter's shape."""
    sid_of = state_ids(optimizer, model)
    state, chosen = {}, []
    for name, p in named_params:
        if id(p) not in sid_of:
            raise ValueError(
                f"the optimizer state_dict names no parameter {name!r}; pass the optimizer built for this model"
            )
        sid = sid_of[id(p)]
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


def preconditioner_family(preconditioner, optimizer, model, layout, forward, batches, *, exponent, passes, seed):
    """(family, info): ``family(eps)`` is the preconditioner at that additive eps, on the run device. A
    named preconditioner's curvature (Adam's moments, a Fisher or Hessian estimate) is computed here,
    once, whatever eps a sweep asks for; None, a user's tensor or matrix ignore eps."""
    device = layout.params[0].device
    if preconditioner is None:
        return (lambda eps: None), {"name": "isotropic"}
    if isinstance(preconditioner, torch.Tensor):
        return (lambda eps: normalize_preconditioner(preconditioner)), {"name": "user"}
    if isinstance(preconditioner, MatrixPreconditioner):
        preconditioner.check_dim(layout.dim)
        return (lambda eps: preconditioner.normalized().to(device)), {"name": "user", "kind": type(preconditioner).__name__}
    started = time.perf_counter()
    info = {"name": preconditioner, "exponent": exponent}
    if preconditioner == "adam":
        moments = _selected_moments(optimizer, model, layout)
        family = lambda eps: adam_preconditioner(moments, exponent=exponent, eps=eps).to(device)  # noqa: E731
    elif preconditioner in ("diag-h", "hessian-eigen"):
        curvature = exact_curvature(preconditioner, model, layout, batches)
        family = lambda eps: curvature_preconditioner(preconditioner, curvature, exponent=exponent, eps=eps).to(device)  # noqa: E731
    else:
        if preconditioner == "hesscale":
            diagonal = hesscale_diagonal(model, layout, batches)
        else:  # "fisher"
            diagonal, info["backward_passes"] = fisher_diagonal(forward, layout, batches, passes=passes, seed=seed)
        name = f"{preconditioner} preconditioner"
        family = lambda eps: inverse_power_preconditioner(diagonal, exponent=exponent, eps=eps, name=name).to(device)  # noqa: E731
    info["seconds"] = time.perf_counter() - started
    return family, info


def _selected_moments(optimizer, model, layout) -> torch.Tensor:
    """Adam's second moments of the perturbed parameters, in layout order, from a live optimizer (by
    identity) or its state_dict (matched through ``selected_optimizer_state``)."""
    named_params = list(zip(layout.names, layout.params))
    if isinstance(optimizer, torch.optim.Optimizer):
        missing = [n for n, p in named_params if not optimizer.state.get(p)]
        if missing:
            raise ValueError(
                f"the optimizer has no state for parameters {missing[:5]}: it optimizes other parameters "
                "or has not taken a step yet"
            )
        source = optimizer
    else:
        source = selected_optimizer_state(optimizer, model, named_params)
    return _adam_moments(source, layout.params, "exp_avg_sq")


def exact_curvature(name: str, model, layout, batches):
    """The raw curvature of "diag-h" (diag F, (D,)) or "hessian-eigen" ((lambda, Q) of F): computed once,
    it serves every eps of a sweep through ``curvature_preconditioner``."""
    if name == "diag-h":
        return output_fisher_diagonal(model, layout, batches)
    check_dense_size(layout.dim, "preconditioner='hessian-eigen'")  # before any Jacobian is computed
    return eigen_decomposition(output_fisher_matrix(model, layout, batches))


def curvature_preconditioner(name: str, curvature, *, exponent: float, eps: float):
    """"diag-h": p = 1 / (diag F^exponent + eps), a (D,) tensor; "hessian-eigen": ``Eigenbasis`` of F with
    scales 1 / (|lambda|^exponent + eps); both normalized to det P = 1."""
    if name == "diag-h":
        return inverse_power_preconditioner(curvature, exponent=exponent, eps=eps, name="diag-h preconditioner")
    values, vectors = curvature
    return spectrum_eigenbasis(values, vectors, exponent=exponent, eps=eps).normalized()
