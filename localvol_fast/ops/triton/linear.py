"""Triton kernel of a linear layer evaluated at B perturbed weights at once, without perturbed copies of W.

For direction b (scale s_b, stream index i_b) and x (B, N, in), W (out, in):

    y_b = x_b (W + s_b P o G_b)^T + (bias + s_b p o g_b)
        = x_b W^T + s_b x_b (P o G_b)^T + bias + s_b p o g_b                            (B, N, out)

G_b[o, i] = element weight_start + o * in + i of the stream g(seed, indices[b]) and g_b[o] = element
bias_start + o (``common.py``); P, p the preconditioners of W and bias (ones when None); o the
element-wise product. The kernel tiles (BLOCK_N x BLOCK_K) @ (BLOCK_K x BLOCK_OUT) with the B axis as a
grid dimension; each program generates its (BLOCK_K x BLOCK_OUT) tile of G_b from the seed next to the
tile of W it loads, so B directions read W (not B perturbed copies of it) and nothing of size
B x out x in is ever stored. Accumulation is float32.

Precision: with x and W both bfloat16 (or both float16) the two products run on the tensor cores in that
dtype, x W^T exactly as an unperturbed layer and x (P o G)^T with P o G rounded to the dtype (an error
relative to the perturbation, not to W, so small perturbations are not lost in W's rounding). Any other
combination computes in float32 with IEEE products (``input_precision="ieee"``): tf32 would add an
error of ~1e-3 relative to |y|, far above the changes a small perturbation makes.
The output has x's dtype.
"""

import torch

from localvol_fast.ops.triton.common import (
    KERNELS_INTERPRETED,
    as_indices,
    check_inputs_device,
    float32_to_bfloat16,
    gaussian_element,
    index_to_uint32,
    is_available,
    key_to_uint32,
    key_words,
    tl,
    triton,
)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "weight_start", "bias_start"])
def _perturbed_linear_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    precond_weight_ptr,
    precond_bias_ptr,
    index_ptr,
    scale_ptr,
    y_ptr,
    N,
    IN,
    OUT,
    key_lo,
    key_hi,
    weight_start,
    bias_start,
    x_stride_b,
    x_stride_n,
    x_stride_i,
    weight_stride_o,
    weight_stride_i,
    precond_weight_stride_o,
    precond_weight_stride_i,
    bias_stride,
    precond_bias_stride,
    y_stride_b,
    y_stride_n,
    y_stride_o,
    HAS_BIAS: tl.constexpr,
    HAS_PRECOND_WEIGHT: tl.constexpr,
    HAS_PRECOND_BIAS: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    X_IS_BFLOAT16: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    OUT_IS_BFLOAT16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_OUT) tile of y_b; program_id(1) = b."""
    tiles_out = tl.cdiv(OUT, BLOCK_OUT)
    tile_n = tl.program_id(0) // tiles_out
    tile_out = tl.program_id(0) % tiles_out
    row = tl.program_id(1).to(tl.int64)
    k0, k1 = key_to_uint32(key_lo, key_hi)
    i_lo, i_hi = index_to_uint32(tl.load(index_ptr + row))
    scale = tl.load(scale_ptr + row).to(tl.float32)

    n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    o = tile_out.to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT).to(tl.int64)  # (BLOCK_OUT,)
    k = tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
    n_inside = n < N
    o_inside = o < OUT

    x_rows = x_ptr + row * x_stride_b + n[:, None] * x_stride_n  # (BLOCK_N, 1)
    w_cols = weight_ptr + o[None, :] * weight_stride_o  # (1, BLOCK_OUT): W^T tile [i, o] = W[o, i]
    pw_cols = precond_weight_ptr + o[None, :] * precond_weight_stride_o
    element_cols = weight_start + o[None, :] * IN  # stream position of W[o, 0]

    acc = tl.zeros([BLOCK_N, BLOCK_OUT], dtype=tl.float32)  # x W^T
    acc_perturbation = tl.zeros([BLOCK_N, BLOCK_OUT], dtype=tl.float32)  # x (P o G)^T
    for k_first in range(0, IN, BLOCK_K):
        i = k_first + k  # (BLOCK_K,)
        i_inside = i < IN
        x_mask = n_inside[:, None] & i_inside[None, :]
        w_mask = i_inside[:, None] & o_inside[None, :]
        x_tile = tl.load(x_rows + i[None, :] * x_stride_i, mask=x_mask, other=0.0)
        w_tile = tl.load(w_cols + i[:, None] * weight_stride_i, mask=w_mask, other=0.0)
        g_tile = gaussian_element(element_cols + i[:, None], i_lo, i_hi, k0, k1)  # (BLOCK_K, BLOCK_OUT)
        if HAS_PRECOND_WEIGHT:
            pw = tl.load(pw_cols + i[:, None] * precond_weight_stride_i, mask=w_mask, other=0.0)
            g_tile = g_tile * pw.to(tl.float32)
        g_tile = tl.where(w_mask, g_tile, 0.0)
        if LOW_PRECISION:
            if X_IS_BFLOAT16:
                g_low = float32_to_bfloat16(g_tile)
            else:
                g_low = g_tile.to(x_tile.dtype)
            if UPCAST_DOT:  # the same products (exact in float32), for the interpreter's broken bf16 dot
                x32 = x_tile.to(tl.float32)
                acc = tl.dot(x32, w_tile.to(tl.float32), acc, input_precision="ieee")
                acc_perturbation = tl.dot(x32, g_low.to(tl.float32), acc_perturbation, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, w_tile, acc)
                acc_perturbation = tl.dot(x_tile, g_low, acc_perturbation)
        else:
            x32 = x_tile.to(tl.float32)
            acc = tl.dot(x32, w_tile.to(tl.float32), acc, input_precision="ieee")
            acc_perturbation = tl.dot(x32, g_tile, acc_perturbation, input_precision="ieee")
    y = acc + scale * acc_perturbation

    if HAS_BIAS:
        bias = tl.load(bias_ptr + o * bias_stride, mask=o_inside, other=0.0).to(tl.float32)
        g_bias = gaussian_element(bias_start + o, i_lo, i_hi, k0, k1)
        if HAS_PRECOND_BIAS:
            g_bias = g_bias * tl.load(precond_bias_ptr + o * precond_bias_stride, mask=o_inside, other=0.0).to(
                tl.float32
            )
        y += (bias + scale * g_bias)[None, :]

    if OUT_IS_BFLOAT16:
        y = float32_to_bfloat16(y)
    y_tile = y_ptr + row * y_stride_b + n[:, None] * y_stride_n + o[None, :] * y_stride_o
    tl.store(y_tile, y, mask=n_inside[:, None] & o_inside[None, :])


def _block_sizes(n: int, n_in: int, n_out: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_OUT, num_warps); tl.dot needs every block >= 16."""

    def fit(size: int, largest: int) -> int:
        return max(16, min(largest, triton.next_power_of_2(max(size, 1))))

    if KERNELS_INTERPRETED:  # the interpreter pays per op: few, small tiles
        return fit(n, 32), fit(n_in, 32), fit(n_out, 32), 4
    # generating G costs far more than the products, and is repeated for every N tile: tall N tiles
    return fit(n, 128), fit(n_in, 32), fit(n_out, 64), 8


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
    """y_b = x_b (W + s_b P G_b)^T + bias + s_b p g_b for x (B, N, in) and weight (out, in): (B, N, out).

    bias, precond_bias (out,) or None; precond_weight (out, in) or None; indices int64 (B,); scales (B,);
    weight_start / bias_start: the stream positions of W[0, 0] and bias[0] (their flat-layout starts).
    Any strides; the output has x's dtype.
    """
    if x.dim() != 3 or weight.dim() != 2 or x.shape[2] != weight.shape[1]:
        raise ValueError(
            "x must be (B, N, in) and weight (out, in) with the same in, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    batch, n, n_in = x.shape
    n_out = weight.shape[0]
    weight_start, bias_start = int(weight_start), int(bias_start)
    if weight_start < 0 or bias_start < 0:
        raise ValueError(f"weight_start and bias_start must be non-negative, got {weight_start}, {bias_start}")
    indices = as_indices(torch.as_tensor(indices, device=x.device))
    scales = torch.as_tensor(scales, device=x.device).reshape(-1)
    if indices.numel() != batch or scales.numel() != batch:
        raise ValueError(
            f"indices and scales need one entry per direction (x.shape[0] = {batch}), got "
            f"{indices.numel()} and {scales.numel()}"
        )
    if precond_weight is not None and tuple(precond_weight.shape) != (n_out, n_in):
        precond_weight = precond_weight.reshape(n_out, n_in)
    for name, vector in (("bias", bias), ("precond_bias", precond_bias)):
        if vector is not None and vector.numel() != n_out:
            raise ValueError(f"{name} must have {n_out} elements, got shape {tuple(vector.shape)}")
    bias = None if bias is None else bias.reshape(-1)
    precond_bias = None if bias is None or precond_bias is None else precond_bias.reshape(-1)
    scales = scales.to(torch.float64).contiguous()

    y = torch.empty(batch, n, n_out, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if n_in == 0:  # x W^T is empty: only the (perturbed) bias
        y.zero_()
        if bias is not None:
            from localvol_fast.ops.triton.directions import perturb_

            b_pert = torch.empty(batch, n_out, dtype=torch.float32, device=x.device)
            perturb_(b_pert, bias, precond_bias, seed, indices, scales, bias_start)
            y += b_pert[:, None, :].to(y.dtype)
        return y
    check_inputs_device(x, weight, bias, precond_weight, precond_bias, indices, scales)

    low_precision = x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
    block_n, block_k, block_out, num_warps = _block_sizes(n, n_in, n_out)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(n_out, block_out), batch)
    key_lo, key_hi = key_words(seed)
    _perturbed_linear_kernel[grid](
        x,
        weight,
        weight if bias is None else bias,
        weight if precond_weight is None else precond_weight,
        weight if precond_bias is None else precond_bias,
        indices,
        scales,
        y,
        n,
        n_in,
        n_out,
        key_lo,
        key_hi,
        weight_start,
        bias_start,
        *x.stride(),
        *weight.stride(),
        *((0, 0) if precond_weight is None else precond_weight.stride()),
        0 if bias is None else bias.stride(0),
        0 if precond_bias is None else precond_bias.stride(0),
        *y.stride(),
        HAS_BIAS=bias is not None,
        HAS_PRECOND_WEIGHT=precond_weight is not None,
        HAS_PRECOND_BIAS=precond_bias is not None,
        LOW_PRECISION=low_precision,
        X_IS_BFLOAT16=x.dtype == torch.bfloat16,
        # Triton's interpreter multiplies the raw bits of bfloat16 tiles in tl.dot
        UPCAST_DOT=KERNELS_INTERPRETED and x.dtype == torch.bfloat16,
        OUT_IS_BFLOAT16=y.dtype == torch.bfloat16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_OUT=block_out,
        num_warps=num_warps,
    )
    return y


__all__ = ["is_available", "perturbed_linear"]
