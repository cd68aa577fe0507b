"""Triton kernel of the KL cost: per row, the mean over unmasked positions of KL(anchor || softmax(logits)).

For one position with anchor log-probabilities a_v and logits l_v over the vocabulary (p_v = exp(a_v)):

    KL = sum_v p_v (a_v - log_softmax(l)_v) = -sum_v p_v (d_v - c) + (sum_v p_v) log sum_v exp(l_v - c)

with d_v = l_v - a_v and ANY shift c (the identity holds for every c). The kernel streams the vocabulary
once per (row, position) in chunks of BLOCK_V, never forming a log-softmax copy, and keeps three float32
running sums S1 = sum p (d - c), S2 = sum exp(l - c), A = sum p, rescaled whenever c moves
(S1 -= A dc, S2 *= exp(-dc)), like the running max of an online softmax. The shift is

    c = max(d at the anchor's most likely token so far,  max l so far - 64)

The first term makes both sums small when the logits are close to the anchor's (l = a + const + small),
so they carry no cancellation against a log-sum-exp of the size of the logits (the naive one-pass
form sum p (a - l) + A lse(l) loses ~ulp(lse) to it); the second keeps exp(l - c) <= e^64 (no
overflow). S2 is kept as A + R with R = sum p expm1(x), x = d - c, so one rounding of x enters S1 and R
alike and cancels to first order. The chunk sums are float32; A, R and S1 carry across chunks in
float64, A's chunk sums too (KL moves one-for-one with an error in A: the A log A term of an anchor
whose float32 probabilities do not sum to exactly 1). What remains is the float32 rounding of
p = exp(a) itself, about 6e-8 * max p absolute, the same floor as the float32 reference.
Tokens with p = 0 contribute nothing (0 log 0 = 0; the reference gives nan); an anchor token the
logits give probability 0 makes KL = inf.

Then, per row n: the mean over positions t with mask[n, t] != 0 (all when mask is None), 0 for a row
with none; float32 (N,). Inputs: logits (N, T, V) or (N, V) in bf16/fp16/fp32 with any strides,
anchor_logprobs the same shape in any float dtype, mask (N, T) (or (N,) for 2-d logits) bool/0-1.
"""

import torch

from localvol_fast.ops.triton.common import KERNELS_INTERPRETED, check_inputs_device, is_available, tl, triton

_BLOCK_V = 1024
_BLOCK_V_INTERPRETED = 128  # the interpreter pays per op, not per element: small chunks test the loop
_SHIFT_HEADROOM = 64.0  # exp(l - c) <= e^64: far from float32 overflow even summed over 2^20 tokens


@triton.jit
def _expm1(x):
    """exp(x) - 1 in float32 without cancellation near 0 (Kahan: (u - 1) x / log u with u = exp(x))."""
    u = tl.exp(x)
    near_zero = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return tl.where(tl.abs(x) < 0.5, near_zero, u - 1.0)


@triton.jit
def _kl_kernel(
    logits_ptr,
    anchor_ptr,
    mask_ptr,
    kl_ptr,
    T,
    V,
    logits_stride_n,
    logits_stride_t,
    logits_stride_v,
    anchor_stride_n,
    anchor_stride_t,
    anchor_stride_v,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HEADROOM: tl.constexpr,
):
    """kl[n * T + t] = KL(anchor || softmax(logits)) at position (n, t); 0 at a masked position."""
    position = tl.program_id(0).to(tl.int64)
    n = position // T
    t = position % T
    logits_row = logits_ptr + n * logits_stride_n + t * logits_stride_t
    anchor_row = anchor_ptr + n * anchor_stride_n + t * anchor_stride_t
    v_end = V
    if HAS_MASK:
        # a masked position streams nothing (and its logits may be garbage)
        v_end = tl.where(tl.load(mask_ptr + position) != 0, V, 0)

    zero32 = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
    zero64 = zero32.to(tl.float64)
    s1 = zero64  # sum p (d - c)
    excess = zero64  # R = sum (exp(l - c) - p) = S2 - A
    mass = zero64  # A = sum p
    shift = zero32 - float("inf")  # c
    best_a = zero32 - float("inf")  # the anchor's largest log-probability so far
    d_at_best = zero32 - float("inf")  # d at that token
    max_l = zero32 - float("inf")
    offsets = tl.arange(0, BLOCK_V)
    for v0 in range(0, v_end, BLOCK_V):
        v = v0 + offsets
        inside = v < V
        l = tl.load(logits_row + v * logits_stride_v, mask=inside, other=float("-inf")).to(tl.float32)
        a = tl.load(anchor_row + v * anchor_stride_v, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.exp(a)
        supported = p > 0
        d = l - a
        # move the shift c, rescaling the sums: S1 -= A dc, S2 = A + R -> (A + R) exp(-dc)
        chunk_best = tl.max(a, axis=0)
        chunk_d = tl.sum(tl.where(offsets == tl.argmax(a, axis=0), d, 0.0), axis=0)
        better = chunk_best > best_a
        d_at_best = tl.where(better, chunk_d, d_at_best)
        best_a = tl.where(better, chunk_best, best_a)
        max_l = tl.maximum(max_l, tl.max(l, axis=0))
        new_shift = tl.maximum(d_at_best, max_l - HEADROOM)
        moved = tl.where(shift == float("-inf"), 0.0, new_shift.to(tl.float64) - shift.to(tl.float64))
        s1 = s1 - mass * moved
        excess = (mass + excess) * tl.exp(-moved) - mass
        shift = new_shift
        # this chunk, in terms of x = d - c (one rounding shared by S1 and R, so it cancels to first
        # order); (l - c) - a is often exact (Sterbenz) where l - a would round at the logits' scale
        x = (l - shift) - a
        p_expm1 = tl.where(x <= 80.0, p * _expm1(x), tl.exp(a + x) - p)  # p e^x - p without overflow
        s1 += tl.sum(tl.where(supported, p * x, 0.0), axis=0).to(tl.float64)
        r = tl.where(supported, p_expm1, tl.where(inside, tl.exp(l - shift), 0.0))
        excess += tl.sum(r, axis=0).to(tl.float64)
        # in float64: KL moves one-for-one with an error in A (the A log A term of an unnormalized anchor)
        mass += tl.sum(p.to(tl.float64), axis=0)
    kl = mass * tl.log(mass + excess) - s1
    kl = tl.where(mass > 0, kl, 0.0)
    tl.store(kl_ptr + position, kl.to(tl.float32))


def kl_against_anchor(
    logits: torch.Tensor, anchor_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row n of (N, T, V) logits: mean over unmasked t of KL(anchor || softmax(logits)); float32 (N,).

    logits (N, T, V) or (N, V), bf16/fp16/fp32, any strides; anchor_logprobs the same shape, any float
    dtype; mask (N, T) (or (N,) for 2-d logits) bool or 0/1, None for all positions. Accumulates in float32.
    """
    if logits.shape != anchor_logprobs.shape:
        raise ValueError(
            f"logits and anchor_logprobs must have one shape, got {tuple(logits.shape)} and "
            f"{tuple(anchor_logprobs.shape)}"
        )
    if logits.dim() == 2:
        logits, anchor_logprobs = logits.unsqueeze(1), anchor_logprobs.unsqueeze(1)
        mask = None if mask is None else mask.reshape(-1, 1)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, T, V) or (N, V), got shape {tuple(logits.shape)}")
    if not (logits.dtype.is_floating_point and anchor_logprobs.dtype.is_floating_point):
        raise ValueError(f"logits and anchor_logprobs must be floating, got {logits.dtype}, {anchor_logprobs.dtype}")
    rows, positions, vocab = logits.shape
    if mask is not None:
        if mask.numel() != rows * positions:
            raise ValueError(f"mask must be ({rows}, {positions}), got shape {tuple(mask.shape)}")
        mask = mask.reshape(rows, positions)
    if rows * positions == 0:
        return torch.zeros(rows, dtype=torch.float32, device=logits.device)
    device = check_inputs_device(logits, anchor_logprobs, mask)

    per_position = torch.empty(rows * positions, dtype=torch.float32, device=device)
    mask_flat = None if mask is None else (mask != 0).to(torch.int8).reshape(-1).contiguous()
    block_v = min(_BLOCK_V_INTERPRETED if KERNELS_INTERPRETED else _BLOCK_V, triton.next_power_of_2(max(vocab, 1)))
    _kl_kernel[(rows * positions,)](
        logits,
        anchor_logprobs,
        per_position if mask_flat is None else mask_flat,
        per_position,
        positions,
        vocab,
        *logits.stride(),
        *anchor_logprobs.stride(),
        HAS_MASK=mask_flat is not None,
        BLOCK_V=block_v,
        HEADROOM=_SHIFT_HEADROOM,
        num_warps=4 if block_v <= 1024 else 8,
    )
    per_position = per_position.reshape(rows, positions)
    if mask_flat is None:
        return per_position.mean(1)
    weight = mask_flat.reshape(rows, positions).to(torch.float32)
    return per_position.sum(1) / weight.sum(1).clamp_min(1.0)


__all__ = ["is_available", "kl_against_anchor"]
