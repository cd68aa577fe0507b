"""Preconditioners P for importance-sampled directions (MATH.md, "Importance-sampled directions").

Directions are w = P u with u uniform on the sphere; the estimator corrects for the changed density
with -D log|w| + log det P. A diagonal P is a positive (D,) tensor, a dense one a
``MatrixPreconditioner`` (``Eigenbasis``: P = Q diag(scales), small D); both are normalized to det P = 1
(mean log of the diagonal or of the scales = 0), so that the last term is (up to rounding) zero; the
estimator still adds the exact log det of what it uses.
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


def log_det(diagonal) -> float:
    """log det P = sum log p_i in float64 (0 for the identity, None); a ``MatrixPreconditioner``'s own."""
    if diagonal is None:
        return 0.0
    if isinstance(diagonal, MatrixPreconditioner):
        return diagonal.log_det()
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


# A dense (D, D) float64 matrix: Q here, and the Gram matrix the check forms in blocks. 16,384 keeps Q
# at 2 GiB; beyond that a low-rank-plus-diagonal form is the one that scales.
MAX_DENSE_DIM = 16_384
# eigh in float64 gives ~1e-13. At 1e-6, log|det Q| (taken as 0) is off by at most about D * 1e-6 nats.
_ORTHONORMAL_ATOL = 1e-6


class MatrixPreconditioner:
    """A non-diagonal P for importance-sampled directions w = P g (MATH.md, "Importance-sampled directions").

    The engine needs only this interface, so a later low-rank-plus-diagonal P = diag(d) + U diag(s) U^T
    (or any matrix-free map) plugs in by implementing it: ``dim``, ``apply``, ``log_det``, ``normalized``,
    ``to`` and ``fingerprint_parts``. Diagonal preconditioners stay plain (D,) tensors and never come here.
    """

    dim: int

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """P g for a (B, D) batch of Gaussian rows: (B, D) float64."""
        raise NotImplementedError

    def log_det(self) -> float:
        """log |det P| in float64."""
        raise NotImplementedError

    def normalized(self) -> "MatrixPreconditioner":
        """The same directions with det P = 1 (the estimator's convention for every preconditioner)."""
        raise NotImplementedError

    def to(self, device) -> "MatrixPreconditioner":
        raise NotImplementedError

    def fingerprint_parts(self) -> dict:
        """{name: tensor or plain value}: what a resumed run must match (the journal checksums the tensors)."""
        raise NotImplementedError

    def check_dim(self, dim: int) -> None:
        if self.dim != dim:
            raise ValueError(
                f"the {type(self).__name__} preconditioner is for D = {self.dim} parameters but D = {dim}; "
                "build it for the perturbed parameters"
            )


def check_dense_size(dim: int, what: str = "an eigenbasis preconditioner") -> None:
    """Refuse D above ``MAX_DENSE_DIM``: a D x D float64 matrix would not fit, or take minutes to check."""
    if dim > MAX_DENSE_DIM:
        gib = dim * dim * 8 / 2**30
        raise ValueError(
            f"{what} needs a dense D x D matrix, but D = {dim:,} (it would take {gib:,.1f} GiB in float64); "
            f"the limit is D <= {MAX_DENSE_DIM:,}. Use a diagonal preconditioner for models this large"
        )


class Eigenbasis(MatrixPreconditioner):
    """P = Q diag(scales): orthonormal columns Q (D, D) and positive per-axis scales (D,), float64.

    With a curvature H = Q diag(lambda) Q^T, scales = lambda^(-1/2) make P^T H P = I: every direction of
    the quadratic C = (1/2) x^T H x then gives the exact volume. |det P| = prod scales since Q is orthogonal.
    The constructor checks that (max |Q^T Q - I| <= atol) unless ``check=False``.
    """

    def __init__(self, vectors: torch.Tensor, scales: torch.Tensor, *, atol: float = _ORTHONORMAL_ATOL, check: bool = True):
        if not isinstance(vectors, torch.Tensor) or not isinstance(scales, torch.Tensor):
            raise TypeError("Eigenbasis takes torch tensors: vectors (D, D) with orthonormal columns, scales (D,)")
        if vectors.dim() != 2 or vectors.shape[0] != vectors.shape[1]:
            raise ValueError(f"Eigenbasis vectors must be a square (D, D) matrix, got shape {tuple(vectors.shape)}")
        check_dense_size(vectors.shape[0])
        self.dim = vectors.shape[0]
        if scales.reshape(-1).numel() != self.dim:
            raise ValueError(f"Eigenbasis scales must have D = {self.dim} values, got {scales.numel()}")
        self.scales = scales.detach().reshape(-1).double()  # as given: ``normalized`` scales them to det P = 1
        normalize_preconditioner(self.scales, name="Eigenbasis scales")  # for its checks: finite and positive
        self.vectors = vectors.detach().double()
        if not bool(torch.isfinite(self.vectors).all()):
            raise ValueError("Eigenbasis vectors contain NaN or inf")
        if check:  # check=False for vectors orthonormal by construction (eigh's): the check is O(D^3)
            _check_orthonormal(self.vectors, atol)

    @classmethod
    def _trusted(cls, vectors: torch.Tensor, scales: torch.Tensor) -> "Eigenbasis":
        """An Eigenbasis of already checked parts (``normalized``, ``to``): the O(D^3) check runs once."""
        out = cls.__new__(cls)
        out.dim, out.vectors, out.scales = vectors.shape[0], vectors, scales
        return out

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        # (P g_b)^T = (g_b * s)^T Q^T for each row b: one float64 matmul for the batch.
        g = g.to(self.vectors.device, torch.float64)
        return (g * self.scales) @ self.vectors.T

    def log_det(self) -> float:
        return float(torch.log(self.scales).sum())

    def normalized(self) -> "Eigenbasis":
        return self._trusted(self.vectors, self.scales * torch.exp(-torch.log(self.scales).mean()))

    def to(self, device) -> "Eigenbasis":
        return self._trusted(self.vectors.to(device), self.scales.to(device))

    def fingerprint_parts(self) -> dict:
        return {"kind": "eigenbasis", "vectors": self.vectors.reshape(-1), "scales": self.scales}


def _check_orthonormal(q: torch.Tensor, atol: float, block: int = 1024) -> None:
    """max |Q^T Q - I| <= atol, the Gram matrix formed a block of columns at a time (memory D x block)."""
    worst, where = 0.0, (0, 0)
    for lo in range(0, q.shape[1], block):
        gram = q.T @ q[:, lo : lo + block]  # (D, block): columns lo.. of Q^T Q
        gram[lo : lo + gram.shape[1]].diagonal().sub_(1.0)
        value, flat = gram.abs().reshape(-1).max(0)
        if float(value) > worst:
            worst, where = float(value), (int(flat) // gram.shape[1], lo + int(flat) % gram.shape[1])
    if not worst <= atol:
        raise ValueError(
            f"Eigenbasis vectors must have orthonormal columns: |Q^T Q - I| is {worst:.3g} at {where} (tolerance "
            f"{atol:g}). Pass the eigenvectors of a symmetric matrix (torch.linalg.eigh) or orthonormalize them"
        )
