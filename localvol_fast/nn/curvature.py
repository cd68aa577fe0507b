"""The exact curvature of a classifier's KL neighborhood at the anchor (MATH.md, "The paper's digits setup").

At the anchor the KL(anchor || theta) has zero value and gradient, and its Hessian is the Fisher of
the output distribution: F = (1/N) sum_x J_x^T (diag(p_x) - p_x p_x^T) J_x, J_x the (C, D) Jacobian of
the logits of input x w.r.t. theta. Since diag(p) - p p^T = (I - 1 p^T)^T diag(p) (I - 1 p^T),
F = (1/N) sum_x A_x^T A_x with A_x = diag(sqrt p_x) (J_x - 1 p_x^T J_x): the diagonal is a sum of
squares of A's columns, the matrix one Gram product. Nothing is sampled (``nn.fisher`` samples labels).
The Jacobians come from ``torch.func`` (jacrev per example, vmapped), in the model's own dtype.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, vmap

from localvol_fast.core.preconditioners import Eigenbasis, check_dense_size
from localvol_fast.nn.costs.functional import substitution_names
from localvol_fast.nn.data import Batch
from localvol_fast.nn.neighborhoods import output_logits

_CHUNK_BYTES = 1 << 28  # per-example Jacobians in flight: examples x C x D x itemsize


def _inputs(batches) -> list[torch.Tensor]:
    """The input tensor of each batch: a classifier's ``model(x)`` with x (N, ...), nothing else."""
    if isinstance(batches, torch.Tensor):
        return [batches]
    inputs = []
    for k, batch in enumerate(batches):
        if not isinstance(batch, Batch) or len(batch.args) != 1 or batch.kwargs or batch.mask is not None:
            raise ValueError(
                f"batch {k}: the exact output Fisher takes classifiers called as model(x) (one input tensor, "
                "no keyword arguments or masks); pass a tensor of inputs or batches of that form"
            )
        inputs.append(batch.args[0])
    return inputs


def _factor_chunks(model, layout, batches):
    """Yield A (n, C, D) float64 for each chunk of examples, chunks sized to keep the Jacobians ~256 MB."""
    theta = layout.flatten()
    names = substitution_names(model, layout)

    def logits_of(flat, x):  # one example's logits, returned twice: the Jacobian's target and its aux
        params = layout.split(flat)
        slots = {alias: params[name] for name, aliases in names.items() for alias in aliases}
        z = output_logits(functional_call(model, slots, (x.unsqueeze(0),), tie_weights=False))
        if z.dim() != 2:
            raise ValueError(f"the model's logits have shape {tuple(z.shape)} for one input; expected (1, C)")
        return z[0], z[0]

    per_example = vmap(jacrev(logits_of, has_aux=True), in_dims=(None, 0))
    for x in _inputs(batches):
        with torch.no_grad():
            classes = logits_of(theta, x[0])[0].numel()
        rows = max(1, _CHUNK_BYTES // (8 * classes * layout.dim))
        for lo in range(0, x.shape[0], rows):
            with torch.enable_grad():
                jac, logits = per_example(theta, x[lo : lo + rows])
            p = torch.softmax(logits.detach().double(), dim=-1)  # (n, C)
            jac = jac.detach().double()
            centered = jac - torch.einsum("nc,ncd->nd", p, jac)[:, None, :]
            yield p.sqrt()[:, :, None] * centered


def output_fisher_diagonal(model, layout, batches) -> torch.Tensor:
    """diag F (D,) float64, exactly, at the model's current weights (the anchor), averaged over examples.

    model: a classifier in eval mode; layout: its perturbed parameters (``ParameterLayout``); batches: a
    tensor of inputs (N, ...) or a list of ``nn.data.Batch`` with one input tensor each.
    """
    total = torch.zeros(layout.dim, dtype=torch.float64, device=layout.params[0].device)
    count = 0
    for a in _factor_chunks(model, layout, batches):
        total += a.pow(2).sum((0, 1))
        count += a.shape[0]
    return total / max(count, 1)


def output_fisher_matrix(model, layout, batches) -> torch.Tensor:
    """F (D, D) float64, exactly (as ``output_fisher_diagonal``); D at most ``MAX_DENSE_DIM``."""
    check_dense_size(layout.dim, "the output Fisher matrix")
    total = torch.zeros(layout.dim, layout.dim, dtype=torch.float64, device=layout.params[0].device)
    count = 0
    for a in _factor_chunks(model, layout, batches):
        flat = a.reshape(-1, layout.dim)
        total.addmm_(flat.T, flat)
        count += a.shape[0]
    return total / max(count, 1)


def fisher_eigenbasis(model, layout, batches, *, exponent: float = 0.5, eps: float = 1e-5) -> Eigenbasis:
    """The paper's full-Hessian preconditioner of the output Fisher F (``spectrum_eigenbasis``).

    Not normalized (``estimate`` normalizes every preconditioner to det P = 1).
    """
    values, vectors = eigen_decomposition(output_fisher_matrix(model, layout, batches))
    return spectrum_eigenbasis(values, vectors, exponent=exponent, eps=eps)


def spectrum_eigenbasis(values: torch.Tensor, vectors: torch.Tensor, *, exponent: float, eps: float) -> Eigenbasis:
    """F = Q diag(lambda) Q^T -> P = Q diag(1 / (|lambda|^exponent + eps)), not normalized.

    Eigenvalues below zero are rounding (F is positive semi-definite) and are taken as their magnitude,
    as the diagonal preconditioners take |v|; eps > 0 keeps the flat directions' scales finite.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0 for the eigenbasis (F has zero eigenvalues), got {eps!r}")
    return Eigenbasis(vectors, 1.0 / (values.abs().pow(exponent) + eps), check=False)  # eigh's Q is orthonormal


def eigen_decomposition(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and orthonormal eigenvectors of a symmetric matrix (symmetrized first), float64."""
    sym = 0.5 * (matrix.double() + matrix.double().T)
    return torch.linalg.eigh(sym)
