"""Pure-PyTorch references of the inner-loop ops (contract: ``SPEC.md`` beside this file).

These are the ground truth the C++, CUDA and Triton kernels are tested against, and the "reference"
backend of the estimator. They favour clarity over memory: each materializes what the kernels stream.
"""

from __future__ import annotations

import torch

from localvol_fast.core.philox import gaussian_directions, philox_bits as _philox_bits


def philox_bits(seed: int, indices: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """uint32 words (as int64) of elements [start, start + length) of each direction: (B, length)."""
    return _philox_bits(seed, indices, length, start=start, device=indices.device)


def gaussian(seed: int, indices: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """float32 Gaussians g(seed, i)[start : start + length] for i in ``indices``: (B, length)."""
    return gaussian_directions(seed, indices, length, start=start, device=indices.device)


def direction_stats(
    seed: int,
    indices: torch.Tensor,
    anchor: torch.Tensor,
    precond: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Per direction (B, 5) float64: sum g^2, sum (p g)^2, sum p g x w, sum (p g)^2 w, box exit factor.

    x is the anchor slice, w the weights (ones when None). The box exit factor is
    min_j (bound_j - sign(p_j g_j) x_j) / |p_j g_j|, the step along p g that first leaves the box
    |theta_j| <= bound_j (inf without bounds); times |p g| it is the exit radius of the unit direction.
    """
    g = gaussian(seed, indices, start, anchor.numel())
    return stats_of_values(g, anchor, precond, weights, bounds)


def stats_of_values(g, anchor, precond=None, weights=None, bounds=None) -> torch.Tensor:
    """``direction_stats`` of given Gaussian vectors g (B, n) instead of generated ones."""
    g = g.double()
    pg = g if precond is None else g * precond.double().reshape(1, -1)
    x = anchor.double().reshape(1, -1)
    w = torch.ones_like(x) if weights is None else weights.double().reshape(1, -1)
    out = torch.empty(g.shape[0], 5, dtype=torch.float64, device=g.device)
    out[:, 0] = (g * g).sum(1)
    out[:, 1] = (pg * pg).sum(1)
    out[:, 2] = (pg * x * w).sum(1)
    out[:, 3] = (pg * pg * w).sum(1)
    if bounds is None or pg.shape[1] == 0:
        out[:, 4] = float("inf")
    else:
        room = bounds.double().reshape(1, -1) - torch.sign(pg) * x
        out[:, 4] = (room / pg.abs()).amin(1)
    return out


def perturb_(
    out: torch.Tensor,
    anchor: torch.Tensor,
    precond: torch.Tensor | None,
    seed: int,
    indices: torch.Tensor,
    scales: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """Write out[b] = anchor + scales[b] * p * g(seed, indices[b])[start : start + n]; returns ``out``."""
    n = anchor.numel()
    pg = gaussian(seed, indices, start, n).double()
    if precond is not None:
        pg = pg * precond.double().reshape(1, n)
    values = anchor.double().reshape(1, n) + scales.double().reshape(-1, 1) * pg
    out.copy_(values.reshape(out.shape))
    return out


def kl_against_anchor(
    logits: torch.Tensor, anchor_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row n of (N, T, V) logits: mean over unmasked t of KL(anchor || softmax(logits)); float32 (N,)."""
    if logits.dim() == 2:
        logits, anchor_logprobs = logits.unsqueeze(1), anchor_logprobs.unsqueeze(1)
        mask = None if mask is None else mask.reshape(-1, 1)
    a = anchor_logprobs.float()
    per_token = (a.exp() * (a - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
    if mask is None:
        return per_token.mean(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precond_weight: torch.Tensor | None,
    precond_bias: torch.Tensor | None,
    seed: int,
    indices: torch.Tensor,
    scales: torch.Tensor,
    weight_start: int,
    bias_start: int = 0,
) -> torch.Tensor:
    """y_b = x_b (W + s_b P G_b)^T + bias + s_b p g_b for x (B, N, in) and weight (out, in): (B, N, out)."""
    n_out, n_in = weight.shape
    w_pert = torch.empty(indices.numel(), n_out * n_in, dtype=torch.float32, device=x.device)
    p_w = None if precond_weight is None else precond_weight.reshape(-1)
    perturb_(w_pert, weight.reshape(-1), p_w, seed, indices, scales, weight_start)
    y = torch.einsum("bni,boi->bno", x.float(), w_pert.reshape(-1, n_out, n_in))
    if bias is not None:
        b_pert = torch.empty(indices.numel(), n_out, dtype=torch.float32, device=x.device)
        perturb_(b_pert, bias, precond_bias, seed, indices, scales, bias_start)
        y = y + b_pert[:, None, :]
    return y.to(x.dtype)
