"""The Triton kernels (``localvol_fast.ops.triton_*``) against the pure-PyTorch references.

Where they run:
- No CUDA device: in Triton's interpreter, on CPU tensors. Triton fixes the mode of every
  ``@triton.jit`` function when it is defined, triton's own helpers (tl.sum, ...) included, so
  ``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported in the process. This module
  sets it itself when it is unset and there is no CUDA device (so it changes nothing where compiled
  Triton could run); that is enough when it is the first to import triton. If another test module
  imported triton first (torch._dynamo does), these tests skip and say so: run
  ``TRITON_INTERPRET=1 python -m pytest ...``, or set the variable in a conftest.
- A CUDA device (and TRITON_INTERPRET unset): the same tests run compiled on CUDA tensors, and the
  ``gpu``-marked tests add larger shapes; without a GPU those are reported as skipped.
The interpreter executes each tile op in numpy, so shapes here are small (the file runs in well under
two minutes on two CPU cores).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

_TRITON_IMPORTED_BEFORE = "triton" in sys.modules
if not _TRITON_IMPORTED_BEFORE and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from localvol_fast.ops import reference  # noqa: E402
from localvol_fast.ops.triton import directions as triton_directions  # noqa: E402
from localvol_fast.ops.triton import kl as triton_kl  # noqa: E402
from localvol_fast.ops.triton import linear as triton_linear  # noqa: E402
from localvol_fast.ops.triton import common as triton_common  # noqa: E402
from localvol_fast.ops.triton import stream as triton_stream  # noqa: E402

if triton_common.is_available():
    _SKIP_REASON = ""
elif _TRITON_IMPORTED_BEFORE and not torch.cuda.is_available():
    _SKIP_REASON = (
        "triton was imported (e.g. by torch._dynamo in another test module) before this module could set "
        "TRITON_INTERPRET=1; run with TRITON_INTERPRET=1 in the environment"
    )
else:
    _SKIP_REASON = "Triton needs a CUDA device or TRITON_INTERPRET=1"

pytestmark = [
    pytest.mark.skipif(not triton_common.is_available(), reason=_SKIP_REASON or "unavailable"),
    # the interpreter evaluates masked-off lanes too (log(0), 0 * inf) in numpy, which warns
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

DEVICE = torch.device("cpu" if triton_common.KERNELS_INTERPRETED else "cuda")
COMPILED_ON_GPU = torch.cuda.is_available() and not triton_common.KERNELS_INTERPRETED
gpu = pytest.mark.gpu
needs_compiled_gpu = pytest.mark.skipif(
    not COMPILED_ON_GPU, reason="needs a CUDA device with compiled (non-interpreted) Triton"
)

BIG_SEED = 2**64 - 1
INDICES = [0, 5, 2**32 + 7, 2**63 - 1]  # the high word of the index matters, and int64's largest value


def _indices(values=INDICES, device=DEVICE):
    return torch.tensor(values, dtype=torch.int64, device=device)


def _assert_gaussians_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-6):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    error = ((actual - expected).abs() / expected.abs().clamp_min(1.0)).max().item() if actual.numel() else 0.0
    assert error <= tolerance, f"Gaussians differ by {error:.3g} relative to max(|z|, 1)"


# ------------------------------------------------------------------------------------------------
# The stream
# ------------------------------------------------------------------------------------------------

STREAM_CASES = [
    # (seed, start, length)
    (0, 0, 1),
    (1, 0, 4),
    (12345, 3, 37),  # start and end inside blocks
    (2**32, 1, 6),  # key high word only
    (2**33 + 11, 2**33 + 5, 29),  # start beyond 2^32: the block's high word
    (BIG_SEED, 2, 1030),  # more than one tile of 256 blocks
]


@pytest.mark.parametrize("seed, start, length", STREAM_CASES)
def test_philox_bits_bit_identical(seed, start, length):
    indices = _indices()
    actual = triton_stream.philox_bits(seed, indices, start, length)
    expected = reference.philox_bits(seed, indices, start, length)
    assert actual.dtype == torch.int64 and actual.shape == (len(INDICES), length)
    assert torch.equal(actual, expected)
    assert int(actual.min()) >= 0 and int(actual.max()) < 2**32


@pytest.mark.parametrize("seed, start, length", STREAM_CASES + [(2**50 + 9, 1, 8191)])
def test_gaussian_matches_reference(seed, start, length):
    indices = _indices()
    _assert_gaussians_close(
        triton_stream.gaussian(seed, indices, start, length), reference.gaussian(seed, indices, start, length)
    )


def test_gaussian_chunks_concatenate_exactly():
    indices = _indices([3, 2**40])
    whole = triton_stream.gaussian(99, indices, 5, 61)
    bounds = [5, 6, 11, 13, 40, 66]
    pieces = [triton_stream.gaussian(99, indices, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def test_stream_empty_requests():
    assert triton_stream.gaussian(1, _indices([]), 3, 10).shape == (0, 10)
    assert triton_stream.philox_bits(1, _indices([1]), 3, 0).shape == (1, 0)


def test_stream_rejects_bad_arguments():
    with pytest.raises(ValueError):
        triton_stream.gaussian(-1, _indices([0]), 0, 4)
    with pytest.raises(ValueError):
        triton_stream.gaussian(2**64, _indices([0]), 0, 4)
    with pytest.raises(ValueError):
        triton_stream.gaussian(0, _indices([-1]), 0, 4)
    with pytest.raises(ValueError):
        triton_stream.gaussian(0, _indices([0]), -1, 4)


def test_is_available_helpers():
    for module in (triton_common, triton_directions, triton_kl, triton_linear):
        assert module.is_available()


# ------------------------------------------------------------------------------------------------
# direction_stats and perturb_
# ------------------------------------------------------------------------------------------------

FLOAT_DTYPES = [
    # (dtype, atol, rtol) of perturb_'s output against the reference: one rounding of the same value,
    # moved by the Gaussians' float32 ulps (scaled by |s p|, at most ~1e-6 here)
    (torch.float32, 1e-5, 1e-6),
    (torch.float64, 1e-5, 1e-6),
    (torch.bfloat16, 1e-5, 2**-7),
    (torch.float16, 1e-5, 2**-10),
]


def _slice_inputs(n, dtype=torch.float32, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    anchor = torch.randn(n, generator=generator, dtype=torch.float64)
    precond = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    bounds = anchor.abs() + torch.rand(n, generator=generator, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (anchor, precond, weights, bounds)]


def _assert_stats_close(actual, expected, seed, indices, anchor, precond, weights, start):
    """Sums within 1e-5 of the sum of absolute terms; the exit factor within 1e-5 relative."""
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    g = reference.gaussian(seed, indices, start, anchor.numel()).double()
    pg = (g if precond is None else g * precond.double()).abs()
    w = 1.0 if weights is None else weights.double().abs()
    x = anchor.double().abs()
    scale = torch.stack([(g * g).sum(1), (pg * pg).sum(1), (pg * x * w).sum(1), (pg * pg * w).sum(1)], 1)
    error = ((actual[:, :4] - expected[:, :4]).abs() / scale.clamp_min(1e-300)).max().item()
    assert error <= 1e-5, f"sums differ by {error:.3g} of their absolute scale"
    finite = torch.isfinite(expected[:, 4])
    assert torch.equal(finite, torch.isfinite(actual[:, 4]))
    torch.testing.assert_close(actual[:, 4][finite], expected[:, 4][finite], atol=0, rtol=1e-5)
    assert torch.equal(actual[:, 4][~finite], expected[:, 4][~finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optional", ["none", "all"])
def test_direction_stats_matches_reference(dtype, optional):
    seed, start, n = 2**40 + 5, 3, 1111  # more than one 1024-element tile, start inside a block
    indices = _indices([1, 2**32 + 7, 9])
    anchor, precond, weights, bounds = _slice_inputs(n, dtype)
    if optional == "none":
        precond = weights = bounds = None
    actual = triton_directions.direction_stats(seed, indices, anchor, precond, weights, bounds, start)
    expected = reference.direction_stats(seed, indices, anchor, precond, weights, bounds, start)
    _assert_stats_close(actual, expected, seed, indices, anchor, precond, weights, start)
    if bounds is None:
        assert torch.isinf(actual[:, 4]).all()


@pytest.mark.parametrize("start", [0, 2**33 + 1])
def test_direction_stats_strided_inputs_and_big_offsets(start):
    seed, n = BIG_SEED, 333
    indices = _indices()
    base = [t for t in _slice_inputs(2 * n, torch.float32, generator_seed=1)]
    anchor, precond, weights, bounds = (t[::2] for t in base)  # every other element: stride 2
    assert not anchor.is_contiguous()
    for kwargs in ({"precond": precond}, {"weights": weights, "bounds": bounds}):
        actual = triton_directions.direction_stats(seed, indices, anchor, start=start, **kwargs)
        expected = reference.direction_stats(seed, indices, anchor, start=start, **kwargs)
        _assert_stats_close(
            actual, expected, seed, indices, anchor, kwargs.get("precond"), kwargs.get("weights"), start
        )


def test_direction_stats_many_programs_per_row():
    # more tiles than programs per row: each program loops over several tiles
    old = triton_directions._MAX_PROGRAMS_PER_ROW
    triton_directions._MAX_PROGRAMS_PER_ROW = 2
    try:
        seed, n = 7, 5 * 1024 + 3
        indices = _indices([4])
        anchor, precond, weights, bounds = _slice_inputs(n)
        actual = triton_directions.direction_stats(seed, indices, anchor, precond, weights, bounds, 1)
        expected = reference.direction_stats(seed, indices, anchor, precond, weights, bounds, 1)
        _assert_stats_close(actual, expected, seed, indices, anchor, precond, weights, 1)
    finally:
        triton_directions._MAX_PROGRAMS_PER_ROW = old


def test_direction_stats_empty():
    anchor = torch.zeros(0, device=DEVICE)
    out = triton_directions.direction_stats(1, _indices([0, 1]), anchor)
    assert out.shape == (2, 5) and torch.equal(out[:, :4], torch.zeros(2, 4, dtype=torch.float64, device=DEVICE))
    assert torch.isinf(out[:, 4]).all()
    assert triton_directions.direction_stats(1, _indices([]), torch.ones(5, device=DEVICE)).shape == (0, 5)


@pytest.mark.parametrize("dtype, atol, rtol", FLOAT_DTYPES)
@pytest.mark.parametrize("with_precond", [False, True])
def test_perturb_matches_reference(dtype, atol, rtol, with_precond):
    seed, start, n = 2**35 + 3, 5, 1030
    indices = _indices([0, 2**32 + 7, 9])
    scales = torch.tensor([0.1, 1e-3, 2.0], dtype=torch.float64, device=DEVICE)
    anchor, precond, _, _ = _slice_inputs(n, torch.float32)
    precond = precond if with_precond else None
    actual = torch.full((3, n), float("nan"), dtype=dtype, device=DEVICE)
    expected = actual.clone()
    assert triton_directions.perturb_(actual, anchor, precond, seed, indices, scales, start) is actual
    reference.perturb_(expected, anchor, precond, seed, indices, scales, start)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", FLOAT_DTYPES[:1] + FLOAT_DTYPES[2:3])
def test_perturb_strided_out_and_single_direction(dtype, atol, rtol):
    seed, start, n = BIG_SEED, 2**33 + 2, 77
    anchor, precond, _, _ = _slice_inputs(2 * n, torch.float64, generator_seed=2)
    anchor, precond = anchor[1::2], precond[::2]
    indices = _indices([2**63 - 1, 3])
    scales = torch.tensor([0.5, -3.0], dtype=torch.float64, device=DEVICE)
    # a transposed (n, B) buffer: out[b] is strided
    actual = torch.zeros(n, 2, dtype=dtype, device=DEVICE).t()
    expected = torch.zeros(2, n, dtype=dtype, device=DEVICE)
    triton_directions.perturb_(actual, anchor, precond, seed, indices, scales, start)
    reference.perturb_(expected, anchor, precond, seed, indices, scales, start)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    # (n,) output for one direction; float32 scales are accepted
    one = torch.zeros(n, dtype=dtype, device=DEVICE)
    triton_directions.perturb_(one, anchor, None, seed, indices[:1], scales[:1].float(), start)
    expected_one = torch.zeros(n, dtype=dtype, device=DEVICE)
    reference.perturb_(expected_one, anchor, None, seed, indices[:1], scales[:1], start)
    torch.testing.assert_close(one, expected_one, atol=atol, rtol=rtol)


def test_perturb_rejects_wrong_shapes():
    anchor = torch.zeros(8, device=DEVICE)
    scales = torch.ones(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="out must have shape"):
        triton_directions.perturb_(torch.zeros(2, 9, device=DEVICE), anchor, None, 0, _indices([0, 1]), scales)
    with pytest.raises(ValueError, match="scales"):
        triton_directions.perturb_(torch.zeros(2, 8, device=DEVICE), anchor, None, 0, _indices([0, 1]), scales[:1])


# ------------------------------------------------------------------------------------------------
# kl_against_anchor
# ------------------------------------------------------------------------------------------------

KL_DTYPES = [
    # (logits dtype, atol, rtol) against the float32 reference run on the same (rounded) logits
    (torch.float32, 2e-7, 1e-5),
    (torch.bfloat16, 2e-7, 1e-5),
    (torch.float16, 2e-7, 1e-5),
]


def _kl_inputs(rows, positions, vocab, offset=5.0, spread=0.05, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    anchor = torch.log_softmax(3 * torch.randn(rows, positions, vocab, generator=generator), -1)
    logits = anchor + offset + spread * torch.randn(rows, positions, vocab, generator=generator)
    return anchor.to(DEVICE), logits.to(DEVICE)


def _kl_float64(logits, anchor, mask=None):
    """The KL in float64 from the same inputs, 0 log 0 = 0 (the ground truth for both)."""
    if logits.dim() == 2:
        logits, anchor = logits.unsqueeze(1), anchor.unsqueeze(1)
        mask = None if mask is None else mask.reshape(-1, 1)
    a = anchor.double()
    p = a.exp()
    per = torch.where(p > 0, p * (a - torch.log_softmax(logits.double(), -1)), 0.0).sum(-1)
    m = torch.ones_like(per) if mask is None else mask.double()
    return (per * m).sum(-1) / m.sum(-1).clamp_min(1.0)


@pytest.mark.parametrize("dtype, atol, rtol", KL_DTYPES)
@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.float64])
def test_kl_matches_reference(dtype, atol, rtol, anchor_dtype):
    anchor, logits = _kl_inputs(3, 4, 301)  # 301: two full 128 chunks and a partial one (interpreter)
    anchor, logits = anchor.to(anchor_dtype), logits.to(dtype)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool, device=DEVICE)
    for m in (None, mask):
        actual = triton_kl.kl_against_anchor(logits, anchor, m)
        expected = reference.kl_against_anchor(logits, anchor, m)
        assert actual.dtype == torch.float32 and actual.shape == (3,)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        # and at least as close as the reference to the float64 value of the same inputs
        truth = _kl_float64(logits, anchor, m)
        assert (actual.double() - truth).abs().max() <= max(1e-7, 1.5 * (expected.double() - truth).abs().max())
    assert triton_kl.kl_against_anchor(logits, anchor, mask)[1].item() == 0.0  # fully masked row


def test_kl_two_dimensional_strided_and_integer_mask():
    anchor, logits = _kl_inputs(5, 1, 200, generator_seed=1)
    anchor, logits = anchor[:, 0], logits[:, 0]
    # logits stored vocabulary-major (stride (1, 5)), anchor with a stride-2 vocabulary
    logits_t = logits.t().contiguous().t()
    anchor_s = torch.stack([anchor, torch.zeros_like(anchor)], -1).reshape(5, -1)[:, ::2]
    assert not logits_t.is_contiguous() and not anchor_s.is_contiguous()
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32, device=DEVICE)
    for m in (None, mask):
        actual = triton_kl.kl_against_anchor(logits_t, anchor_s, m)
        torch.testing.assert_close(actual, reference.kl_against_anchor(logits, anchor, m), atol=2e-7, rtol=1e-5)
    # (N, V) logits: each row is one position, so a masked row is 0
    assert triton_kl.kl_against_anchor(logits_t, anchor_s, mask)[1].item() == 0.0


@pytest.mark.parametrize("offset, spread", [(0.0, 1e-3), (1000.0, 1e-3), (50.0, 1e-5), (-30.0, 3.0)])
def test_kl_close_to_float64(offset, spread):
    # small and large KL, logits far from normalized: the error stays at the float32 floor of exp(a)
    anchor, logits = _kl_inputs(2, 2, 257, offset=offset, spread=spread, generator_seed=3)
    truth = _kl_float64(logits, anchor)
    actual = triton_kl.kl_against_anchor(logits, anchor)
    torch.testing.assert_close(actual.double(), truth, atol=1e-7, rtol=2e-6)


def test_kl_zero_probability_tokens():
    anchor, logits = _kl_inputs(2, 3, 150, generator_seed=4)
    anchor = anchor.clone()
    anchor[..., :40] = float("-inf")  # tokens the anchor never emits: 0 log 0 = 0 (the reference gives nan)
    anchor = torch.log_softmax(anchor, -1)
    actual = triton_kl.kl_against_anchor(logits, anchor)
    torch.testing.assert_close(actual.double(), _kl_float64(logits, anchor), atol=2e-7, rtol=1e-5)
    # a token the anchor emits and the logits forbid: KL = inf
    logits = logits.clone()
    logits[0, 1, 100] = float("-inf")
    assert math.isinf(triton_kl.kl_against_anchor(logits, anchor)[0].item())


def test_kl_empty_and_bad_shapes():
    empty = torch.zeros(2, 0, 7, device=DEVICE)
    assert torch.equal(triton_kl.kl_against_anchor(empty, empty), torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="one shape"):
        triton_kl.kl_against_anchor(torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 3, 5, device=DEVICE))


# ------------------------------------------------------------------------------------------------
# perturbed_linear
# ------------------------------------------------------------------------------------------------

LINEAR_DTYPES = [
    # (dtype, atol, rtol) against the reference (which perturbs W in float32, then rounds y to dtype)
    (torch.float32, 2e-5, 1e-5),
    (torch.float64, 2e-5, 1e-5),
    (torch.bfloat16, 0.0, 0.0),  # low precision: judged against the float32 value, see below
    (torch.float16, 0.0, 0.0),
]


def _linear_inputs(batch, n, n_in, n_out, dtype, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(batch, n, n_in, generator=generator)
    weight = torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in)
    bias = torch.randn(n_out, generator=generator)
    precond_weight = torch.rand(n_out, n_in, generator=generator) + 0.5
    precond_bias = torch.rand(n_out, generator=generator) + 0.5
    x, weight, bias = (t.to(dtype).to(DEVICE) for t in (x, weight, bias))
    return x, weight, bias, precond_weight.to(DEVICE), precond_bias.to(DEVICE)


def _assert_linear_close(actual, expected, float32_value, dtype, atol, rtol):
    assert actual.dtype == dtype and actual.shape == expected.shape
    if dtype in (torch.bfloat16, torch.float16):
        # at most twice the reference's own rounding error against the float32 value, plus one ulp
        ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
        own = (actual.float() - float32_value).abs().max().item()
        reference_error = (expected.float() - float32_value).abs().max().item()
        assert own <= 2 * reference_error + ulp * float32_value.abs().max().item(), (own, reference_error)
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", LINEAR_DTYPES)
def test_perturbed_linear_matches_reference(dtype, atol, rtol):
    # odd sizes: two K tiles (37 > 32), two OUT tiles (40 > 32); starts not multiples of 4, beyond 2^32
    x, weight, bias, pw, pb = _linear_inputs(3, 5, 37, 40, dtype)
    seed, weight_start, bias_start = 2**35 + 3, 2**33 + 1001, 6
    indices = _indices([0, 2**33 + 1, 2**63 - 1])
    scales = torch.tensor([0.1, 1e-3, 1.0], dtype=torch.float64, device=DEVICE)
    args = (seed, indices, scales, weight_start, bias_start)
    actual = triton_linear.perturbed_linear(x, weight, bias, pw, pb, *args)
    expected = reference.perturbed_linear(x, weight, bias, pw, pb, *args)
    float32_value = reference.perturbed_linear(x.float(), weight.float(), bias.float(), pw, pb, *args)
    _assert_linear_close(actual, expected, float32_value, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", LINEAR_DTYPES[:1] + LINEAR_DTYPES[2:3])
def test_perturbed_linear_strided_without_bias_or_precond(dtype, atol, rtol):
    x, weight, bias, pw, pb = _linear_inputs(2, 7, 19, 17, dtype, generator_seed=1)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, in) with the batch axis in the middle
    weight = weight.t().contiguous().t()  # (out, in) stored column-major
    assert not x.is_contiguous() and not weight.is_contiguous()
    indices = _indices([11, 2**32])
    scales = torch.tensor([0.3, -2.0], dtype=torch.float64, device=DEVICE)
    for b, p_w, p_b in ((None, pw, None), (bias, None, None), (bias, None, pb)):
        args = (BIG_SEED, indices, scales, 3, 1)
        actual = triton_linear.perturbed_linear(x, weight, b, p_w, p_b, *args)
        expected = reference.perturbed_linear(x, weight, b, p_w, p_b, *args)
        float32_value = reference.perturbed_linear(
            x.float(), weight.float(), None if b is None else b.float(), p_w, p_b, *args
        )
        _assert_linear_close(actual, expected, float32_value, dtype, atol, rtol)


def test_perturbed_linear_is_the_perturbed_weight():
    # x = identity: y_b = (W + s_b P G_b)^T, the same weights perturb_ writes
    n_out, n_in = 6, 9
    x = torch.eye(n_in, device=DEVICE).expand(2, n_in, n_in)
    weight = torch.randn(n_out, n_in, device=DEVICE)
    indices, scales = _indices([1, 2]), torch.tensor([0.5, 2.0], dtype=torch.float64, device=DEVICE)
    y = triton_linear.perturbed_linear(x, weight, None, None, None, 77, indices, scales, 13)
    perturbed = torch.empty(2, n_out * n_in, device=DEVICE)
    triton_directions.perturb_(perturbed, weight.reshape(-1), None, 77, indices, scales, 13)
    torch.testing.assert_close(y, perturbed.reshape(2, n_out, n_in).transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_perturbed_linear_rejects_mismatched_shapes():
    x, weight, *_ = _linear_inputs(2, 3, 5, 4, torch.float32)
    indices, scales = _indices([0, 1]), torch.ones(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="same in"):
        triton_linear.perturbed_linear(x, weight.t(), None, None, None, 0, indices, scales, 0)
    with pytest.raises(ValueError, match="one entry per direction"):
        triton_linear.perturbed_linear(x, weight, None, None, None, 0, indices[:1], scales, 0)


# ------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (skipped without one): larger shapes than the interpreter can afford
# ------------------------------------------------------------------------------------------------


@gpu
@needs_compiled_gpu
def test_gpu_stream_large():
    indices = _indices([0, 1, 2**32 + 7, 2**63 - 1], device="cuda")
    for seed, start, length in ((0, 0, 1 << 20), (BIG_SEED, 2**33 + 3, 300_001)):
        bits = triton_stream.philox_bits(seed, indices, start, length)
        assert torch.equal(bits, reference.philox_bits(seed, indices, start, length))
        _assert_gaussians_close(
            triton_stream.gaussian(seed, indices, start, length), reference.gaussian(seed, indices, start, length)
        )


@gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype, atol, rtol", FLOAT_DTYPES)
def test_gpu_directions_large(dtype, atol, rtol):
    n, start, seed = 3_000_001, 2**33 + 1, 2**40 + 5
    indices = _indices([1, 2**32 + 7, 9, 2**63 - 1], device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    anchor = torch.randn(n, device="cuda", generator=generator).to(dtype)
    precond = torch.rand(n, device="cuda", generator=generator) + 0.5
    weights = torch.rand(n, device="cuda", generator=generator)
    bounds = anchor.float().abs() + 1
    actual = triton_directions.direction_stats(seed, indices, anchor, precond, weights, bounds, start)
    expected = reference.direction_stats(seed, indices, anchor, precond, weights, bounds, start)
    _assert_stats_close(actual, expected, seed, indices, anchor, precond, weights, start)
    scales = torch.tensor([0.1, 1e-3, 2.0, -1.0], dtype=torch.float64, device="cuda")
    out = torch.empty(4, n, dtype=dtype, device="cuda")
    triton_directions.perturb_(out, anchor, precond, seed, indices, scales, start)
    expected_out = reference.perturb_(torch.empty_like(out), anchor, precond, seed, indices, scales, start)
    torch.testing.assert_close(out, expected_out, atol=atol, rtol=rtol)


@gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype, atol, rtol", KL_DTYPES)
def test_gpu_kl_large_vocabulary(dtype, atol, rtol):
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, positions, vocab = 4, 33, 50_257
    anchor = torch.log_softmax(3 * torch.randn(rows, positions, vocab, device="cuda", generator=generator), -1)
    logits = (anchor + 7 + 0.05 * torch.randn(rows, positions, vocab, device="cuda", generator=generator)).to(dtype)
    mask = torch.rand(rows, positions, device="cuda", generator=generator) > 0.3
    mask[2] = False
    for m in (None, mask):
        actual = triton_kl.kl_against_anchor(logits, anchor, m)
        torch.testing.assert_close(actual, reference.kl_against_anchor(logits, anchor, m), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(actual.double(), _kl_float64(logits, anchor, m), atol=5e-7, rtol=1e-5)


@gpu
@needs_compiled_gpu
@pytest.mark.parametrize("dtype, atol, rtol", LINEAR_DTYPES)
def test_gpu_perturbed_linear_large(dtype, atol, rtol):
    x, weight, bias, pw, pb = (t.cuda() for t in _linear_inputs(3, 300, 515, 257, dtype) if t is not None)
    indices = _indices([0, 2**33 + 1, 2**63 - 1], device="cuda")
    scales = torch.tensor([0.1, 1e-3, 1.0], dtype=torch.float64, device="cuda")
    args = (2**35 + 3, indices, scales, 2**33 + 1001, 6)
    actual = triton_linear.perturbed_linear(x, weight, bias, pw, pb, *args)
    expected = reference.perturbed_linear(x, weight, bias, pw, pb, *args)
    float32_value = reference.perturbed_linear(x.float(), weight.float(), bias.float(), pw, pb, *args)
    # float32 matmuls on the GPU: allow for the longer reduction (and cuBLAS's own summation order)
    scale = 10.0 if dtype in (torch.float32, torch.float64) else 1.0
    _assert_linear_close(actual, expected, float32_value, dtype, scale * atol, scale * rtol)
