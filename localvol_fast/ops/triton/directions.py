"""Triton kernels of the per-direction statistics and of the in-place perturbation.

With g = g(seed, indices[b])[start : start + n] the stream's Gaussians (``common.py``), p the
preconditioner (ones when None), w the weights (ones when None), x the anchor slice and c the box bounds:

``direction_stats`` -> float64 (B, 5), per direction b:
    [ sum_j g_j^2,  sum_j (p_j g_j)^2,  sum_j p_j g_j x_j w_j,  sum_j (p_j g_j)^2 w_j,
      min_j (c_j - sign(p_j g_j) x_j) / |p_j g_j|  (inf without bounds) ]

``perturb_`` writes out[b] = x + scales[b] * p * g (computed in float64, stored in out's dtype).

Neither materializes a (B, n) Gaussian tensor: the Gaussians are generated tile by tile from the seed.
The statistics accumulate in float64: each program sums a contiguous span of the slice into float64
partials (B, programs, 5), and a small torch reduction finishes the sums (and the minimum).
"""

import torch

from localvol_fast.ops.triton.common import (
    as_indices,
    check_inputs_device,
    float32_to_bfloat16,
    index_to_uint32,
    is_available,
    key_to_uint32,
    key_words,
    stream_tile,
    tl,
    triton,
)

_BLOCKS = 256  # 4-element blocks per tile: 1024 elements
_MAX_PROGRAMS_PER_ROW = 1024  # bounds the partial sums to (B, 1024, 5) float64


@triton.jit(do_not_specialize=["key_lo", "key_hi", "start", "n", "tiles_per_program"])
def _direction_stats_kernel(
    index_ptr,
    anchor_ptr,
    precond_ptr,
    weights_ptr,
    bounds_ptr,
    partial_ptr,
    key_lo,
    key_hi,
    start,
    n,
    tiles_per_program,
    anchor_stride,
    precond_stride,
    weights_stride,
    bounds_stride,
    HAS_PRECOND: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """partial[b, program, :] = the five statistics over this program's span of tiles."""
    program = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    k0, k1 = key_to_uint32(key_lo, key_hi)
    i_lo, i_hi = index_to_uint32(tl.load(index_ptr + row))

    sum_g2 = tl.zeros([BLOCKS, 4], dtype=tl.float64)
    sum_pg2 = tl.zeros([BLOCKS, 4], dtype=tl.float64)
    sum_pgxw = tl.zeros([BLOCKS, 4], dtype=tl.float64)
    sum_pg2w = tl.zeros([BLOCKS, 4], dtype=tl.float64)
    exit_factor = tl.full([BLOCKS, 4], float("inf"), dtype=tl.float64)
    first_tile = program * tiles_per_program
    for t in range(0, tiles_per_program):
        first_block = start // 4 + (first_tile + t) * BLOCKS
        z, column, inside = stream_tile(first_block, start, n, i_lo, i_hi, k0, k1, BLOCKS)
        g = tl.where(inside, z, 0.0).to(tl.float64)
        x = tl.load(anchor_ptr + column * anchor_stride, mask=inside, other=0.0).to(tl.float64)
        if HAS_PRECOND:
            pg = g * tl.load(precond_ptr + column * precond_stride, mask=inside, other=0.0).to(tl.float64)
        else:
            pg = g
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + column * weights_stride, mask=inside, other=0.0).to(tl.float64)
            pgx_w = pg * x * w
            pg2_w = pg * pg * w
        else:
            pgx_w = pg * x
            pg2_w = pg * pg
        sum_g2 += g * g
        sum_pg2 += pg * pg
        sum_pgxw += pgx_w
        sum_pg2w += pg2_w
        if HAS_BOUNDS:
            bound = tl.load(bounds_ptr + column * bounds_stride, mask=inside, other=0.0).to(tl.float64)
            signed_x = tl.where(pg > 0, x, tl.where(pg < 0, -x, 0.0))
            factor = (bound - signed_x) / tl.where(inside, tl.abs(pg), 1.0)
            exit_factor = tl.minimum(exit_factor, tl.where(inside, factor, float("inf")))
    out = partial_ptr + (row * n_programs + program) * 5
    tl.store(out + 0, tl.sum(tl.sum(sum_g2, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(sum_pg2, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(sum_pgxw, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(sum_pg2w, axis=1), axis=0))
    tl.store(out + 4, tl.min(tl.min(exit_factor, axis=1), axis=0))


def _check_vector(name: str, value: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if value is None:
        return None
    if value.numel() != n:
        raise ValueError(f"{name} must have the anchor's {n} elements, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        value = value.double()
    # a 1-d view keeps a strided vector strided (no copy); anything else is flattened
    return value if value.dim() == 1 else value.reshape(-1)


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

    anchor (n,) any float dtype (the slice [start, start + n) of the flat parameters); precond,
    weights, bounds (n,) or None; indices int64 (B,). The box exit factor is
    min_j (bound_j - sign(p_j g_j) x_j) / |p_j g_j| (inf without bounds).
    """
    start = int(start)
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    indices = as_indices(indices, anchor.device)
    n = anchor.numel()
    anchor = anchor.reshape(-1) if anchor.dim() != 1 else anchor
    precond = _check_vector("precond", precond, n)
    weights = _check_vector("weights", weights, n)
    bounds = _check_vector("bounds", bounds, n)
    batch = indices.numel()
    if batch == 0 or n == 0:
        out = torch.zeros(batch, 5, dtype=torch.float64, device=anchor.device)
        out[:, 4] = float("inf")
        return out
    check_inputs_device(indices, anchor, precond, weights, bounds)

    tile = 4 * _BLOCKS
    n_tiles = (start % 4 + n + tile - 1) // tile  # tiles cover [4 floor(start/4), start + n)
    programs = min(n_tiles, _MAX_PROGRAMS_PER_ROW)
    tiles_per_program = triton.cdiv(n_tiles, programs)
    programs = triton.cdiv(n_tiles, tiles_per_program)
    partial = torch.empty(batch, programs, 5, dtype=torch.float64, device=anchor.device)
    key_lo, key_hi = key_words(seed)
    _direction_stats_kernel[(programs, batch)](
        indices,
        anchor,
        anchor if precond is None else precond,
        anchor if weights is None else weights,
        anchor if bounds is None else bounds,
        partial,
        key_lo,
        key_hi,
        start,
        n,
        tiles_per_program,
        anchor.stride(0),
        0 if precond is None else precond.stride(0),
        0 if weights is None else weights.stride(0),
        0 if bounds is None else bounds.stride(0),
        HAS_PRECOND=precond is not None,
        HAS_WEIGHTS=weights is not None,
        HAS_BOUNDS=bounds is not None,
        BLOCKS=_BLOCKS,
    )
    out = torch.empty(batch, 5, dtype=torch.float64, device=anchor.device)
    out[:, :4] = partial[:, :, :4].sum(1)
    out[:, 4] = partial[:, :, 4].amin(1) if bounds is not None else float("inf")
    return out


@triton.jit(do_not_specialize=["key_lo", "key_hi", "start", "n"])
def _perturb_kernel(
    out_ptr,
    anchor_ptr,
    precond_ptr,
    index_ptr,
    scale_ptr,
    key_lo,
    key_hi,
    start,
    n,
    out_row_stride,
    out_column_stride,
    anchor_stride,
    precond_stride,
    HAS_PRECOND: tl.constexpr,
    OUT_IS_FLOAT64: tl.constexpr,
    OUT_IS_BFLOAT16: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """out[b, j] = anchor[j] + scale[b] * p[j] * g_j for one tile of 4 BLOCKS elements."""
    row = tl.program_id(1).to(tl.int64)
    k0, k1 = key_to_uint32(key_lo, key_hi)
    i_lo, i_hi = index_to_uint32(tl.load(index_ptr + row))
    scale = tl.load(scale_ptr + row).to(tl.float64)
    first_block = start // 4 + tl.program_id(0).to(tl.int64) * BLOCKS
    z, column, inside = stream_tile(first_block, start, n, i_lo, i_hi, k0, k1, BLOCKS)
    pg = z.to(tl.float64)
    if HAS_PRECOND:
        pg = pg * tl.load(precond_ptr + column * precond_stride, mask=inside, other=0.0).to(tl.float64)
    x = tl.load(anchor_ptr + column * anchor_stride, mask=inside, other=0.0).to(tl.float64)
    value = x + scale * pg
    # through float32 for narrower outputs, as torch's own double -> bfloat16 copy rounds
    if OUT_IS_BFLOAT16:
        value = float32_to_bfloat16(value.to(tl.float32))
    elif not OUT_IS_FLOAT64:
        value = value.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + column * out_column_stride, value, mask=inside)


def perturb_(
    out: torch.Tensor,
    anchor: torch.Tensor,
    precond: torch.Tensor | None,
    seed: int,
    indices: torch.Tensor,
    scales: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """Write out[b] = anchor + scales[b] * p * g(seed, indices[b])[start : start + n]; returns ``out``.

    out (B, n) or (n,) (then B = 1) in any float dtype and any strides; anchor (n,); precond (n,) or
    None; scales (B,) (float64 preferred: the sum is formed in float64 and rounded once to out's dtype).
    """
    start = int(start)
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    indices = as_indices(indices, anchor.device)
    n = anchor.numel()
    batch = indices.numel()
    view = out.unsqueeze(0) if out.dim() == 1 else out
    if view.dim() != 2 or tuple(view.shape) != (batch, n):
        raise ValueError(
            f"out must have shape ({batch}, {n}) (or ({n},) for one direction), got {tuple(out.shape)}"
        )
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must have a floating dtype, got {out.dtype}")
    scales = torch.as_tensor(scales, device=anchor.device).reshape(-1)
    if scales.numel() != batch:
        raise ValueError(f"scales must have one value per direction ({batch}), got {scales.numel()}")
    scales = scales.to(torch.float64).contiguous()
    anchor = anchor.reshape(-1) if anchor.dim() != 1 else anchor
    precond = _check_vector("precond", precond, n)
    if batch == 0 or n == 0:
        return out
    check_inputs_device(out, anchor, precond, indices, scales)
    n_blocks = (start + n + 3) // 4 - start // 4
    grid = (triton.cdiv(n_blocks, _BLOCKS), batch)
    key_lo, key_hi = key_words(seed)
    _perturb_kernel[grid](
        view,
        anchor,
        anchor if precond is None else precond,
        indices,
        scales,
        key_lo,
        key_hi,
        start,
        n,
        view.stride(0),
        view.stride(1),
        anchor.stride(0),
        0 if precond is None else precond.stride(0),
        HAS_PRECOND=precond is not None,
        OUT_IS_FLOAT64=out.dtype == torch.float64,
        OUT_IS_BFLOAT16=out.dtype == torch.bfloat16,
        BLOCKS=_BLOCKS,
    )
    return out


__all__ = ["is_available", "direction_stats", "perturb_"]
