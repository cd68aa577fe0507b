"""The package's one random stream: Philox-4x32-10 counters turned into Gaussian directions.

Direction ``i`` of a run with seed ``s`` is the vector ``g(s, i)`` in R^D whose element ``j`` is fixed by
``(s, i, j)`` alone, so it never depends on the batch size, the chunking or the device. Every backend
(this pure-PyTorch reference, the C++ and CUDA kernels in ``csrc/`` and the Triton kernels) implements
exactly this definition:

- key   = (s mod 2^32, floor(s / 2^32) mod 2^32)            (a 64-bit seed)
- block = floor(j / 4); counter = (block mod 2^32, floor(block / 2^32), i mod 2^32, floor(i / 2^32))
- (x0, x1, x2, x3) = Philox-4x32-10(counter, key)              (Salmon et al., SC'11; Random123 constants)
- uniform(x) = (floor(x / 2^8) + 0.5) * 2^-24                  (24 bits, exact in float32, in (0, 1))
- Box-Muller in float32 on the pairs (x0, x1) and (x2, x3):
  rho = sqrt(-2 log uniform(x0)), phi = 2 pi uniform(x1)  ->  lanes 0, 1 = rho cos(phi), rho sin(phi)
  and likewise lanes 2, 3 from (x2, x3).
- element j = lane (j mod 4) of its block.

The uint32 words are bit-identical on every backend; the float32 Gaussians agree to a few ulp (they
depend on each platform's log, sin and cos).

Torch has no unsigned 32-bit arithmetic, so the reference holds the words in int64 and forms the
32 x 32 -> 64 bit products from 16-bit halves, which keeps every intermediate below 2^63.
"""

from __future__ import annotations

import torch

from localvol_fast.core.checks import check_seed

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_TWO_PI_F32 = 6.2831854820251465  # float32(2 pi), so every backend multiplies by the same number


def _mulhilo32(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * multiplier for int64 tensors holding uint32 values."""
    m_hi, m_lo = multiplier >> 16, multiplier & 0xFFFF
    p_lo = a * m_lo  # < 2^48
    p_hi = a * m_hi  # < 2^48; the full product is p_hi * 2^16 + p_lo
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    high = (p_hi + (p_lo >> 16)) >> 16
    return high, low


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = PHILOX_ROUNDS):
    """Philox-4x32 on int64 tensors of uint32 values (broadcast together). Returns four int64 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def seed_to_key(seed: int) -> tuple[int, int]:
    """The Philox key of a run's seed; seeds are integers in [0, 2^64)."""
    seed = check_seed(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) from uint32 words held in int64: (floor(x / 2^8) + 0.5) * 2^-24."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def _box_muller(x_radius: torch.Tensor, x_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rho = torch.sqrt(-2.0 * torch.log(uniform_from_bits(x_radius)))
    phi = uniform_from_bits(x_angle) * _TWO_PI_F32
    return rho * torch.cos(phi), rho * torch.sin(phi)


def _block_words(seed: int, indices: torch.Tensor, start: int, dim: int):
    """Philox words of the 4-element blocks covering [start, start + dim) of each direction: 4 x (B, blocks)."""
    first_block, last_block = start // 4, (start + dim + 3) // 4
    blocks = torch.arange(first_block, last_block, dtype=torch.int64, device=indices.device)
    counter = (blocks[None, :] & _MASK32, blocks[None, :] >> 32, indices[:, None] & _MASK32, indices[:, None] >> 32)
    return philox4x32(counter, seed_to_key(seed))


def _check_request(indices, dim: int, start: int, device) -> torch.Tensor:
    if dim < 0 or start < 0:
        raise ValueError(f"dim and start must be non-negative, got dim={dim}, start={start}")
    indices = torch.as_tensor(indices, dtype=torch.int64, device=device).reshape(-1)
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"direction indices must be non-negative, got {int(indices.min())}")
    return indices


def _interleave(lanes, n_rows: int, start: int, dim: int) -> torch.Tensor:
    flat = torch.stack(lanes, dim=-1).reshape(n_rows, -1)
    offset = start - 4 * (start // 4)
    return flat[:, offset : offset + dim]


def philox_bits(seed: int, indices, dim: int, start: int = 0, device=None) -> torch.Tensor:
    """The uint32 words (held in int64) behind elements [start, start + dim) of directions ``indices``: (B, dim)."""
    indices = _check_request(indices, dim, start, device)
    return _interleave(_block_words(seed, indices, start, dim), indices.numel(), start, dim)


def gaussian_directions(seed: int, indices, dim: int, start: int = 0, device=None) -> torch.Tensor:
    """Elements [start, start + dim) of the Gaussian vectors g(seed, i) for i in ``indices``.

    Returns a float32 tensor of shape (len(indices), dim). ``start`` lets a caller produce a long
    vector in chunks; the chunks concatenate to exactly the whole vector.
    """
    indices = _check_request(indices, dim, start, device)
    x0, x1, x2, x3 = _block_words(seed, indices, start, dim)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return _interleave((z0, z1, z2, z3), indices.numel(), start, dim)


def gaussian_chunks(seed: int, index: int, dim: int, chunk: int = 1 << 20, device=None):
    """Yield (start, values) pieces of one long direction without holding it whole."""
    for start in range(0, dim, chunk):
        length = min(chunk, dim - start)
        yield start, gaussian_directions(seed, [index], length, start=start, device=device)[0]


__all__ = [
    "philox4x32",
    "philox_bits",
    "seed_to_key",
    "uniform_from_bits",
    "gaussian_directions",
    "gaussian_chunks",
]
