"""The Triton launchers of the random stream: ``philox_bits`` and ``gaussian`` (the stream: ``core/philox.py``;
its device functions: ``common.py``)."""

import torch

from localvol_fast.ops.triton.common import (
    as_indices,
    box_muller,
    check_inputs_device,
    check_range,
    index_to_uint32,
    key_to_uint32,
    key_words,
    philox_block,
    select_lane,
    tl,
    triton,
)

@triton.jit(do_not_specialize=["key_lo", "key_hi", "start", "length"])
def _stream_kernel(
    index_ptr,
    out_ptr,
    key_lo,
    key_hi,
    start,
    length,
    out_row_stride,
    WORDS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """out[b, j] = word (WORDS) or Gaussian of element start + j of direction index[b]."""
    row = tl.program_id(1).to(tl.int64)
    k0, k1 = key_to_uint32(key_lo, key_hi)
    i_lo, i_hi = index_to_uint32(tl.load(index_ptr + row))
    first_block = start // 4 + tl.program_id(0).to(tl.int64) * BLOCKS
    block = first_block + tl.arange(0, BLOCKS).to(tl.int64)
    lane = tl.arange(0, 4)[None, :]
    column = block[:, None] * 4 + lane - start
    inside = (column >= 0) & (column < length)
    x0, x1, x2, x3 = philox_block(block, i_lo, i_hi, k0, k1)
    if WORDS:
        value = select_lane(lane, x0, x1, x2, x3).to(tl.int64)
    else:
        z0, z1 = box_muller(x0, x1)
        z2, z3 = box_muller(x2, x3)
        value = select_lane(lane, z0, z1, z2, z3)
    tl.store(out_ptr + row * out_row_stride + column, value, mask=inside)


def _launch_stream(seed, indices, start, length, words: bool, blocks: int = 256) -> torch.Tensor:
    start, length = check_range(start, length)
    device = indices.device if isinstance(indices, torch.Tensor) else None
    indices = as_indices(indices, device)
    key_lo, key_hi = key_words(seed)
    dtype = torch.int64 if words else torch.float32
    out = torch.empty(indices.numel(), length, dtype=dtype, device=indices.device)
    if out.numel() == 0:
        return out
    check_inputs_device(indices)
    n_blocks = (start + length + 3) // 4 - start // 4
    grid = (triton.cdiv(n_blocks, blocks), indices.numel())
    _stream_kernel[grid](indices, out, key_lo, key_hi, start, length, out.stride(0), WORDS=words, BLOCKS=blocks)
    return out


def philox_bits(seed: int, indices, start: int, length: int) -> torch.Tensor:
    """The uint32 Philox words (held in int64) of elements [start, start + length): (B, length).

    indices: int64 (B,) direction indices (the device of the kernel); seed in [0, 2^64).
    """
    return _launch_stream(seed, indices, start, length, words=True)


def gaussian(seed: int, indices, start: int, length: int) -> torch.Tensor:
    """float32 Gaussians g(seed, i)[start : start + length] for i in ``indices``: (B, length)."""
    return _launch_stream(seed, indices, start, length, words=False)


__all__ = ["philox_bits", "gaussian"]
