"""tyche's ``precondition.py``: ``diag_preconditioner``, and how the estimators apply any preconditioner.

A preconditioner P turns each unit direction u into w = P u. The estimators accept a callable (as
tyche's ``get_estimates_vectorized_gauss`` does), a ``DiagPreconditioner``, a (D,) diagonal or a (D, D)
matrix (as tyche's ``get_estimates_vectorized`` does); for all but plain callables the exact log|det P|
is known and added to the estimates.
"""

from __future__ import annotations

import math

import torch

from localvol_fast.core.preconditioners import normalize_preconditioner

__all__ = ["DiagPreconditioner", "diag_preconditioner"]


class DiagPreconditioner:
    """The callable x -> x * p returned by ``diag_preconditioner`` (p a (D,) float64 tensor, mean log p = 0).

    Applied to a (..., D) tensor it returns a tensor of the same dtype (float64 inside), like tyche's
    lambda. The estimators recognize it and use ``p`` in float64 directly, adding ``log_det``.
    """

    def __init__(self, p: torch.Tensor):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.shape[-1:] != self.p.shape:
            raise ValueError(
                f"the preconditioner has {self.p.numel()} entries but the vectors have shape {tuple(x.shape)}; "
                "pass a (D,) vector or a (B, D) batch"
            )
        out = x.to(torch.float64) * self.p.to(x.device)
        return out.to(x.dtype) if x.is_floating_point() else out

    @property
    def log_det(self) -> float:
        """log det P = sum log p (0 up to rounding)."""
        return float(torch.log(self.p).sum())

    def __repr__(self) -> str:
        return f"DiagPreconditioner(D={self.p.numel()}, log_det={self.log_det:.3g})"


def diag_preconditioner(spec, eps: float = 1e-3, exponent: float = 0.5) -> DiagPreconditioner:
    """Diagonal preconditioner p = 1 / (|spec|^exponent + eps), rescaled so that mean(log p) = 0 (det P = 1).

    spec: (D,) curvature estimate, e.g. Adam's ``exp_avg_sq`` (the paper: exponent 0.5, eps 1e-5).
    Returns a callable applying x -> x * p to a (B, D) batch (or a (D,) vector), as tyche's does; p is
    computed in float64 (``.p``), so det P = 1 to rounding even for D in the billions.
    """
    spec = torch.as_tensor(spec).detach().reshape(-1).to(torch.float64)
    if not (math.isfinite(float(exponent)) and float(exponent) > 0):
        raise ValueError(f"exponent must be a positive number, got {exponent!r}")
    if not float(eps) >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not bool(torch.isfinite(spec).all()):
        raise ValueError("spec holds NaN or inf values; the curvature estimate is corrupted")
    raw = 1.0 / (spec.abs() ** float(exponent) + float(eps))
    return DiagPreconditioner(normalize_preconditioner(raw, name="diag_preconditioner (1 / (|spec|^exponent + eps))"))


def precondition_draw(preconditioner, g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Unit rows of the draw ``g`` (B, D), preconditioned: (w float64 (B, D), log|det P|)."""
    if preconditioner is not None and not isinstance(preconditioner, (DiagPreconditioner, torch.Tensor)):
        return _apply_callable(preconditioner, g)
    g64 = g.to(torch.float64)
    u = g64 / torch.linalg.vector_norm(g64, dim=1, keepdim=True)
    if preconditioner is None:
        return u, 0.0
    if isinstance(preconditioner, DiagPreconditioner):
        if preconditioner.p.numel() != g.shape[1]:
            raise ValueError(f"the preconditioner has {preconditioner.p.numel()} entries but params has {g.shape[1]}")
        return u * preconditioner.p.to(u.device), preconditioner.log_det
    return _apply_tensor(preconditioner, u)


def _apply_tensor(preconditioner: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A (D,) diagonal times u, or u @ P.T for a (D, D) matrix P, with log|det P|."""
    dim = u.shape[1]
    P = preconditioner.detach().to(device=u.device, dtype=torch.float64)
    if P.dim() == 1 and P.numel() == dim:
        if not bool((torch.isfinite(P) & (P != 0)).all()):
            raise ValueError("a diagonal preconditioner must be finite and nonzero everywhere")
        return u * P, float(torch.log(P.abs()).sum())
    if P.dim() == 2 and tuple(P.shape) == (dim, dim):
        sign, logabsdet = torch.linalg.slogdet(P)
        if float(sign) == 0:
            raise ValueError("the preconditioner matrix is singular")
        return u @ P.T, float(logabsdet)
    raise ValueError(
        f"a tensor preconditioner must be a (D,) diagonal or a (D, D) matrix with D = {dim}, "
        f"got shape {tuple(P.shape)}"
    )


def _apply_callable(preconditioner, g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """tyche's exact operations: float32 unit rows, then the callable; det P is assumed to be 1."""
    if not callable(preconditioner):
        raise TypeError(
            "preconditioner must be None, a callable on a (B, D) batch (e.g. diag_preconditioner(...)), "
            f"a (D,) tensor or a (D, D) matrix; got {type(preconditioner).__name__}"
        )
    out = preconditioner(g / torch.norm(g, dim=1, keepdim=True))
    w = torch.as_tensor(out).to(device=g.device, dtype=torch.float64)
    if tuple(w.shape) != tuple(g.shape):
        raise ValueError(f"the preconditioner returned shape {tuple(w.shape)} for a batch of shape {tuple(g.shape)}")
    return w, 0.0
