"""Diagonal preconditioners P for importance-sampled directions (MATH.md, "Importance-sampled directions").

Directions are w = P u with u uniform on the sphere; the estimator corrects for the changed density
with -D log|w| + log det P. Every preconditioner here is a positive (D,) tensor normalized to
det P = 1 (mean of log p_i = 0), so that the last term is (up to rounding) zero; the estimator still
adds the exact log det of the tensor it uses.
"""

from __future__ import annotations

import math

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


def inverse_power_preconditioner(
    values: torch.Tensor, *, exponent: float, eps: float, name: str, source: str = "curvature values"
) -> torch.Tensor:
    """p_i = 1 / (|v_i|^exponent + eps) of a curvature estimate v (Adam moments, a Fisher diagonal),
    normalized to det P = 1: the paper's diagonal preconditioners. Returns (D,) float64.
    """
    if not (math.isfinite(float(exponent)) and float(exponent) > 0):
        raise ValueError(f"exponent must be a positive number, got {exponent!r}")
    if not float(eps) >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    v = values.detach().reshape(-1).double().abs()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"the {source} contain NaN or inf; they are corrupted (the {name} needs finite values)")
    return normalize_preconditioner(1.0 / (v.pow(exponent) + eps), name=name)
