"""Diagonal preconditioners P for importance-sampled directions (MATH.md, "Importance-sampled directions").

Directions are w = P u with u uniform on the sphere; the estimator corrects for the changed density
with -D log|w| + log det P. Every preconditioner here is a positive (D,) tensor normalized to
det P = 1 (mean of log p_i = 0), so that the last term is (up to rounding) zero; the estimator still
adds the exact log det of the tensor it uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def normalize_preconditioner(diagonal: torch.Tensor, *, name: str = "preconditioner") -> torch.Tensor:
    """Check that ``diagonal`` is a finite positive vector and scale it to det P = 1.

    Returns a 1-D tensor in float64 (float32 input stays float32, so huge models need no double copy).
    """
    if not isinstance(diagonal, torch.Tensor):
        diagonal = torch.as_tensor(diagonal, dtype=torch.float64)
    if not diagonal.is_floating_point():
        diagonal = diagonal.double()
    flat = diagonal.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError(f"{name} is empty; pass one positive value per perturbed parameter")
    bad = ~torch.isfinite(flat) | (flat <= 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite and positive everywhere; element {first} is {float(flat[first])!r} "
            f"({int(bad.sum())} bad values of {flat.numel()}). Add a small eps or clamp it."
        )
    dtype = torch.float32 if flat.dtype == torch.float32 else torch.float64
    mean_log = torch.log(flat.double()).mean()
    return (flat.double() * torch.exp(-mean_log)).to(dtype)


def log_det(diagonal: torch.Tensor | None) -> float:
    """log det P = sum log p_i in float64 (0 for the identity, None)."""
    if diagonal is None:
        return 0.0
    return float(torch.log(diagonal.double()).sum())


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
        pieces = []
        for i in ids:
            if i not in source["state"]:
                raise ValueError(f"the optimizer state_dict has no state for parameter id {i}; take it after a step")
            pieces.append(_moments_from_state(source["state"][i], key, f"parameter id {i}"))
        flat = torch.cat(pieces)
        if params is not None:
            expected = sum(p.numel() for p in params)
            if flat.numel() != expected:
                raise ValueError(
                    f"the optimizer state_dict holds {flat.numel()} values but the parameters have {expected}; "
                    "it belongs to other parameters"
                )
        return flat
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
    if not exponent > 0:
        raise ValueError(f"exponent must be positive, got {exponent!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")
    if isinstance(source, torch.Tensor):
        v = source.detach().reshape(-1)
    else:
        v = _adam_moments(source, params, "exp_avg_sq" if moment == 2 else "exp_avg")
    dtype = torch.float32 if v.dtype == torch.float32 else torch.float64
    v = v.double().abs()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("the optimizer moments contain NaN or inf; the optimizer state is corrupted")
    # Normalized in float64 (raw values may not fit float32), then kept in the moments' precision.
    return normalize_preconditioner(1.0 / (v.pow(exponent) + eps), name="adam preconditioner").to(dtype)
