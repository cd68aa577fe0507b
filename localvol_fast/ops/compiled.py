"""The Python face of the compiled kernels in ``csrc/`` (ops ``torch.ops.localvol.*``, contract ``SPEC.md``).

Importing ``localvol_fast._C`` registers the op schemas and the CPU (and, in a CUDA build, CUDA)
kernels with the torch dispatcher. This module stays importable without the extension: it then
warns once, ``is_available`` answers False and the wrappers raise an error saying how to build it.

The wrappers take the same arguments as ``reference.py``; seeds are integers in [0, 2^64).
"""

from __future__ import annotations

import warnings

import torch

from localvol_fast.core.checks import check_seed

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(set CUDA_HOME for the CUDA kernels; see csrc/README.md)"
)
OPS = ("philox_bits", "gaussian", "direction_stats", "perturb_", "kl_against_anchor")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

try:
    from localvol_fast import _C  # noqa: F401  (the import registers torch.ops.localvol.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = error
    warnings.warn(
        f"localvol_fast._C is not available ({error}); the compiled kernels are disabled; {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )


def is_available(device_type: str = "cpu") -> bool:
    """Whether every op has a kernel registered for ``device_type`` ("cpu" or "cuda").

    This asks the dispatcher, not the hardware: "cuda" is True in a CUDA build even on a machine
    without a GPU (check ``torch.cuda.is_available()`` as well before running there).
    """
    key = _DISPATCH_KEYS.get(str(device_type))
    if key is None:
        raise ValueError(f"device_type must be one of {sorted(_DISPATCH_KEYS)}, got {device_type!r}")
    if _C is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"localvol::{op}", key) for op in OPS)


def _ops():
    if _C is None:
        raise RuntimeError(f"the compiled localvol ops are not available ({_LOAD_ERROR}); {BUILD_HINT}")
    return torch.ops.localvol


def _signed_seed(seed: int) -> int:
    """A seed in [0, 2^64) as the int64 with the same bits (the schema's ``int``)."""
    seed = check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed


def _as_indices(indices) -> torch.Tensor:
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.int64:
        return indices.reshape(-1)
    return torch.as_tensor(indices, dtype=torch.int64).reshape(-1)


def philox_bits(seed: int, indices: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """The stream's uint32 words (held in int64) of elements [start, start + length).

    indices: (B,) int64 direction indices. Returns (B, length) int64 on indices' device.
    """
    return _ops().philox_bits(_signed_seed(seed), _as_indices(indices), int(start), int(length))


def gaussian(seed: int, indices: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """float32 Gaussians g(seed, i)[start : start + length] for i in indices (B,): (B, length)."""
    return _ops().gaussian(_signed_seed(seed), _as_indices(indices), int(start), int(length))


def direction_stats(
    seed: int,
    indices: torch.Tensor,
    anchor: torch.Tensor,
    precond: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Per direction, float64 (B, 5): sum g^2, sum (p g)^2, sum p g x w, sum (p g)^2 w, box exit factor.

    g = g(seed, i)[start : start + n] for i in indices (B,); x = anchor (n,); p = precond (n,) and
    w = weights (n,) (ones when None); the exit factor is min_j (bound_j - sign(p_j g_j) x_j) / |p_j g_j|
    for bounds (n,), inf without bounds. Sums accumulate in float64.
    """
    return _ops().direction_stats(
        _signed_seed(seed), _as_indices(indices), anchor, precond, weights, bounds, int(start)
    )


def perturb_(
    out: torch.Tensor,
    anchor: torch.Tensor,
    precond: torch.Tensor | None,
    seed: int,
    indices: torch.Tensor,
    scales: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """Write out[b] = anchor + scales[b] * p * g(seed, indices[b])[start : start + n] in place; returns out.

    out: (B, n) or (n,) (B = 1), any float dtype; anchor, precond: (n,); scales: (B,) (float64 used).
    Computed in float64 and rounded once to out's dtype; no (B, n) Gaussian temporary.
    """
    scales = torch.as_tensor(scales, dtype=torch.float64, device=out.device).reshape(-1)
    _ops().perturb_(out, anchor, precond, _signed_seed(seed), _as_indices(indices), scales, int(start))
    return out


def kl_against_anchor(
    logits: torch.Tensor, anchor_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row n, the mean over unmasked t of KL(anchor || softmax(logits[n, t])) in nats: float32 (N,).

    logits: (N, T, V) or (N, V), any float dtype; anchor_logprobs: the anchor's log-probabilities, same
    shape; mask: (N, T) bool or 0/1 (weights), None for all positions. KL = sum_v exp(a_v) (a_v -
    log_softmax(logits)_v), streamed in float32 without a (N, T, V) temporary; rows with no unmasked
    position give 0. Anchor entries with probability exactly 0 contribute 0.
    """
    return _ops().kl_against_anchor(logits, anchor_logprobs, mask)


if _C is not None:
    # Shape-only (fake) kernels, for torch.compile and torch.library.opcheck.

    @torch.library.register_fake("localvol::philox_bits")
    def _philox_bits_fake(seed, indices, start, length):
        return indices.new_empty((indices.numel(), length), dtype=torch.int64)

    @torch.library.register_fake("localvol::gaussian")
    def _gaussian_fake(seed, indices, start, length):
        return indices.new_empty((indices.numel(), length), dtype=torch.float32)

    @torch.library.register_fake("localvol::direction_stats")
    def _direction_stats_fake(seed, indices, anchor, precond, weights, bounds, start):
        return anchor.new_empty((indices.numel(), 5), dtype=torch.float64)

    @torch.library.register_fake("localvol::perturb_")
    def _perturb_fake(out, anchor, precond, seed, indices, scales, start):
        return None

    @torch.library.register_fake("localvol::kl_against_anchor")
    def _kl_against_anchor_fake(logits, anchor_logprobs, mask):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)


__all__ = [
    "BUILD_HINT",
    "OPS",
    "is_available",
    "philox_bits",
    "gaussian",
    "direction_stats",
    "perturb_",
    "kl_against_anchor",
]
