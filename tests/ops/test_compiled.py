"""The compiled ops (csrc/, torch.ops.localvol) against the pure-PyTorch references of ops/reference.py.

Every test runs on each backend whose kernels are registered: "cpu" when localvol_fast._C is built,
"cuda" (marked gpu) when it is a CUDA build and a GPU is present; the reference always runs on the
CPU and the kernel's result is compared there. A backend without kernels is reported as skipped.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from localvol_fast.ops import compiled, reference

CPU = pytest.param(
    "cpu",
    marks=pytest.mark.skipif(
        not compiled.is_available("cpu"), reason=f"localvol CPU kernels not registered; {compiled.BUILD_HINT}"
    ),
)
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(
            not (compiled.is_available("cuda") and torch.cuda.is_available()),
            reason="localvol CUDA kernels not registered or no CUDA device",
        ),
    ],
)
DEVICES = [CPU, CUDA]

SEEDS = [0, 12345, 2**32 + 7, 2**64 - 1]
BIG_INDEX = 2**40 + 3
# (start, length): starts not multiples of 4, odd lengths, a start beyond 2^32 blocks.
RANGES = [(0, 1), (1, 3), (3, 5), (0, 1023), (5, 4099), (4 * 2**33 + 2, 7)]


def _indices(batch, device):
    base = [0, 1, 2, 9, 31, BIG_INDEX, 2**62 + 1][:batch]
    return torch.tensor(base, dtype=torch.int64, device=device)


def _close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, equal_nan=True)


# ---------------------------------------------------------------- the random stream


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("start, length", RANGES)
def test_stream_matches_reference(device, seed, batch, start, length):
    idx = _indices(batch, device)
    bits = compiled.philox_bits(seed, idx, start, length)
    assert bits.dtype == torch.int64 and bits.shape == (batch, length) and bits.device.type == device
    assert torch.equal(bits.cpu(), reference.philox_bits(seed, idx.cpu(), start, length))  # bit-identical
    g = compiled.gaussian(seed, idx, start, length)
    assert g.dtype == torch.float32 and g.shape == (batch, length)
    _close(g, reference.gaussian(seed, idx.cpu(), start, length), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_stream_chunks_concatenate_exactly(device):
    idx = _indices(3, device)
    whole = compiled.gaussian(7, idx, 0, 1001)
    pieces = [compiled.gaussian(7, idx, s, min(s + 97, 1001) - s) for s in range(0, 1001, 97)]
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert torch.equal(compiled.gaussian(7, idx[2:3], 0, 1001), whole[2:3])
    assert torch.equal(compiled.gaussian(7, idx.flip(0)[::2], 0, 1001), whole.flip(0)[::2])  # strided indices


@pytest.mark.parametrize("device", DEVICES)
def test_stream_empty_requests(device):
    idx = _indices(3, device)
    assert compiled.philox_bits(1, idx, 5, 0).shape == (3, 0)
    assert compiled.gaussian(1, idx[:0], 5, 9).shape == (0, 9)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    idx = _indices(2, device)
    with pytest.raises(ValueError, match="start"):
        compiled.gaussian(0, idx, -1, 4)
    with pytest.raises(ValueError, match="seed"):
        compiled.gaussian(2**64, idx, 0, 4)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.localvol.gaussian(0, idx.int(), 0, 4)
    with pytest.raises(ValueError, match="precond"):
        compiled.direction_stats(0, idx, torch.ones(5, device=device), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="out"):
        compiled.perturb_(torch.empty(3, 5, device=device), torch.ones(5, device=device), None, 0, idx,
                          torch.ones(2, dtype=torch.float64, device=device))
    if device == "cpu":  # the CUDA kernels do not synchronize to check the indices
        with pytest.raises(ValueError, match="non-negative"):
            compiled.gaussian(0, torch.tensor([3, -1]), 0, 4)


# ---------------------------------------------------------------- direction_stats

# (anchor dtype, atol, rtol): sums in float64 of terms whose Gaussians agree to a few float32 ulp.
STATS_DTYPES = [(torch.float64, 1e-4, 1e-5), (torch.float32, 1e-4, 1e-5), (torch.bfloat16, 1e-4, 1e-5),
                (torch.float16, 1e-4, 1e-5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", STATS_DTYPES)
@pytest.mark.parametrize("n", [1, 3, 5, 1023, 4099])
@pytest.mark.parametrize("batch", [1, 7])
def test_direction_stats_matches_reference(device, dtype, atol, rtol, n, batch):
    gen = torch.Generator().manual_seed(n)
    anchor = (torch.randn(2 * n, generator=gen) * 0.3).to(dtype)[::2]  # non-contiguous
    precond = torch.rand(n, generator=gen).to(dtype) + 0.5
    weights = torch.rand(n, generator=gen).to(dtype)
    bounds = (anchor.abs().float() + torch.rand(n, generator=gen) + 0.1).to(dtype)
    idx = _indices(batch, device)
    for start in (0, 3, 2**33 + 1):
        for p, w, b in [(None, None, None), (precond, None, None), (precond, weights, bounds), (None, weights, bounds)]:
            on = lambda t: None if t is None else t.to(device)  # noqa: E731
            got = compiled.direction_stats(2**63 + 11, idx, anchor.to(device), on(p), on(w), on(b), start)
            want = reference.direction_stats(2**63 + 11, idx.cpu(), anchor, p, w, b, start)
            assert got.dtype == torch.float64 and got.shape == (batch, 5)
            _close(got, want, atol=atol, rtol=rtol)
            if b is None:
                assert torch.isinf(got[:, 4]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_direction_stats_empty_and_mixed_dtypes(device):
    idx = _indices(3, device)
    empty = compiled.direction_stats(1, idx, torch.empty(0, device=device), bounds=torch.empty(0, device=device))
    assert torch.equal(empty[:, :4].cpu(), torch.zeros(3, 4, dtype=torch.float64))
    assert torch.isinf(empty[:, 4]).all()
    assert compiled.direction_stats(1, idx[:0], torch.ones(4, device=device)).shape == (0, 5)
    anchor = torch.randn(37, dtype=torch.float64)
    precond = torch.rand(37).half() + 0.5  # float16 precond with a float64 anchor: read as float64
    got = compiled.direction_stats(5, idx, anchor.to(device), precond.to(device), start=2)
    _close(got, reference.direction_stats(5, idx.cpu(), anchor, precond, start=2), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- perturb_

# (out dtype, atol, rtol): computed in float64 then rounded once; the Gaussians agree to a few ulp.
PERTURB_DTYPES = [(torch.float64, 1e-6, 1e-6), (torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1e-2, 1e-2),
                  (torch.float16, 2e-3, 2e-3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", PERTURB_DTYPES)
@pytest.mark.parametrize("n", [1, 5, 1023, 4099])
@pytest.mark.parametrize("batch", [1, 7])
def test_perturb_matches_reference(device, dtype, atol, rtol, n, batch):
    gen = torch.Generator().manual_seed(n + batch)
    anchor = torch.randn(n, generator=gen)
    precond = torch.rand(n, generator=gen) + 0.5
    scales = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.1
    idx = _indices(batch, device)
    for p, start in [(None, 0), (precond, 3), (precond, 2**34 + 1)]:
        want = reference.perturb_(torch.empty(batch, n, dtype=dtype), anchor, p, 2**32 + 9, idx.cpu(), scales, start)
        out = torch.full((batch, n), float("nan"), dtype=dtype, device=device)
        on_device = None if p is None else p.to(device)
        returned = compiled.perturb_(out, anchor.to(device), on_device, 2**32 + 9, idx, scales.to(device), start)
        assert returned is out
        _close(out, want, atol=atol, rtol=rtol)
        # A strided out: (n, B) storage seen transposed, and every other column of a wider buffer.
        transposed = torch.empty(n, batch, dtype=dtype, device=device).t()
        compiled.perturb_(transposed, anchor.to(device), on_device, 2**32 + 9, idx, scales.to(device), start)
        _close(transposed, want, atol=atol, rtol=rtol)
        wide = torch.zeros(batch, 2 * n, dtype=dtype, device=device)
        compiled.perturb_(wide[:, ::2], anchor.to(device), on_device, 2**32 + 9, idx, scales.to(device), start)
        _close(wide[:, ::2], want, atol=atol, rtol=rtol)
        assert not wide[:, 1::2].any()  # untouched
        if batch == 1:
            flat = torch.empty(n, dtype=dtype, device=device)
            compiled.perturb_(flat, anchor.to(device), on_device, 2**32 + 9, idx, scales.to(device), start)
            _close(flat, want[0], atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_low_precision_anchor_and_empty(device):
    idx = _indices(2, device)
    anchor = torch.randn(11).bfloat16()
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    want = reference.perturb_(torch.empty(2, 11), anchor, None, 3, idx.cpu(), scales, 1)
    got = compiled.perturb_(torch.empty(2, 11, device=device), anchor.to(device), None, 3, idx, scales.to(device), 1)
    _close(got, want, atol=1e-6, rtol=1e-6)
    empty = torch.empty(2, 0, device=device)
    compiled.perturb_(empty, torch.empty(0, device=device), None, 3, idx, scales.to(device), 0)


# ---------------------------------------------------------------- kl_against_anchor

# (logits dtype, atol, rtol): both sides read the inputs exactly and work in float32.
KL_DTYPES = [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 2e-5, 1e-4), (torch.float16, 2e-5, 1e-4),
             (torch.float64, 2e-5, 1e-4)]


def _kl_inputs(shape, dtype, anchor_dtype, gen, spread=0.3):
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype)
    anchor = torch.log_softmax(logits.float() + spread * torch.randn(shape, generator=gen), dim=-1).to(anchor_dtype)
    return logits, anchor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", KL_DTYPES)
# (5, 7, 10) and (40, 3): small vocabularies, whose positions the CPU kernel takes 16 at a time.
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (5, 7, 10), (40, 3), (3, 5, 1023), (7, 2, 4099), (5, 1023), (7, 1)])
@pytest.mark.parametrize("anchor_same_dtype", [True, False])
def test_kl_matches_reference(device, dtype, atol, rtol, shape, anchor_same_dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    logits, anchor = _kl_inputs(shape, dtype, dtype if anchor_same_dtype else torch.float32, gen)
    got = compiled.kl_against_anchor(logits.to(device), anchor.to(device))
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    _close(got, reference.kl_against_anchor(logits, anchor), atol=atol, rtol=rtol)
    # Masks: bool with a fully masked row, and 0/1 integers.
    mask_shape = shape[:2] if len(shape) == 3 else shape[:1]
    mask = torch.rand(mask_shape, generator=gen) > 0.4
    mask[0] = False
    for m in (mask, mask.long()):
        got = compiled.kl_against_anchor(logits.to(device), anchor.to(device), m.to(device))
        want = reference.kl_against_anchor(logits, anchor, m)
        _close(got, want, atol=atol, rtol=rtol)
        assert got[0] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_kl_non_contiguous_and_edge_cases(device):
    gen = torch.Generator().manual_seed(0)
    logits, anchor = _kl_inputs((3, 6, 257), torch.float32, torch.float32, gen)
    # Shifted language-model slices (strided outer dims) and a strided vocabulary.
    got = compiled.kl_against_anchor(logits.to(device)[:, :-1], anchor.to(device)[:, 1:])
    _close(got, reference.kl_against_anchor(logits[:, :-1], anchor[:, 1:]), atol=2e-5, rtol=1e-4)
    wide = torch.randn(3, 6, 514, generator=gen)
    got = compiled.kl_against_anchor(wide.to(device)[..., ::2], anchor.to(device))
    _close(got, reference.kl_against_anchor(wide[..., ::2], anchor), atol=2e-5, rtol=1e-4)
    # The anchor itself: KL 0. Tiny neighbourhoods: KL ~ 1e-6 must still be resolved.
    same = compiled.kl_against_anchor(anchor.to(device), anchor.to(device))
    assert same.abs().max() < 1e-6
    near = anchor + 1e-3 * torch.randn(anchor.shape, generator=gen)
    _close(compiled.kl_against_anchor(near.to(device), anchor.to(device)),
           reference.kl_against_anchor(near, anchor), atol=2e-7, rtol=2e-2)
    # Empty: no rows, no positions (0 by the contract; the reference's mean of nothing is nan).
    assert compiled.kl_against_anchor(torch.empty(0, 4, 5, device=device), torch.empty(0, 4, 5, device=device)).shape == (0,)
    no_positions = compiled.kl_against_anchor(torch.empty(2, 0, 5, device=device), torch.empty(2, 0, 5, device=device))
    assert torch.equal(no_positions.cpu(), torch.zeros(2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [10, 300])
def test_kl_extreme_logits_and_impossible_classes(device, vocab):
    """Logits far apart (exp underflows to 0 for most classes), anchor classes of probability exactly 0,
    and +-inf logits: the kernel's exp must match the float64 ground truth."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, 9, vocab, generator=gen) * 60
    anchor = torch.log_softmax(logits + torch.randn(logits.shape, generator=gen), -1)
    anchor[0, :, 1:] = -math.inf  # the anchor is certain of class 0
    anchor[1, :, : vocab // 2] = -math.inf
    anchor[2, 0] = 0.0  # uniform after the log_softmax
    anchor = torch.log_softmax(anchor, -1)
    logits[2, 0, 3] = -math.inf  # a class the probe rules out, that the anchor gives probability to
    a = anchor.double()
    terms = torch.where(a.exp() > 0, a.exp() * (a - torch.log_softmax(logits.double(), -1)), 0)
    truth = terms.sum(-1).mean(-1)
    got = compiled.kl_against_anchor(logits.to(device), anchor.to(device)).cpu().double()
    assert torch.isinf(truth[2]) and torch.isinf(got[2])
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(got[keep], truth[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_resolves_tiny_divergences_at_a_real_vocabulary(device, dtype):
    """Against a float64 ground truth, KL ~ 1e-6 over a 50k vocabulary is resolved to 1e-6 absolute."""
    gen = torch.Generator().manual_seed(1)
    logits, anchor = _kl_inputs((2, 3, 50257), dtype, torch.float32, gen, spread=1e-3)
    a = anchor.double()
    truth = (a.exp() * (a - torch.log_softmax(logits.double(), -1))).sum(-1).mean(-1)
    got = compiled.kl_against_anchor(logits.to(device), anchor.to(device)).cpu().double()
    assert (truth > 5e-7).all() and (truth < 1e-5).all()
    assert (got - truth).abs().max() < 1e-6, (got, truth)


# ---------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    idx = _indices(3, device)
    anchor = torch.randn(13, device=device)
    p = torch.rand(13, device=device) + 0.5
    logits = torch.randn(2, 3, 11, device=device)
    return {
        "philox_bits": [(-5, idx, 3, 9)],
        "gaussian": [(2**40, idx, 1, 10)],
        "direction_stats": [(3, idx, anchor, p, p, p + 3, 2), (3, idx, anchor, None, None, None, 0)],
        "perturb_": [
            (torch.empty(3, 13, device=device), anchor, p, 4, idx, torch.rand(3, dtype=torch.float64, device=device), 1),
            (torch.empty(3, 13, device=device, dtype=torch.bfloat16), anchor, None, 4, idx,
             torch.rand(3, dtype=torch.float64, device=device), 0),
        ],
        "kl_against_anchor": [
            (logits, torch.log_softmax(torch.randn_like(logits), -1), torch.ones(2, 3, dtype=torch.bool, device=device)),
            (logits[:, 0].bfloat16(), torch.log_softmax(logits[:, 1], -1), None),
        ],
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", compiled.OPS)
def test_opcheck(device, op):
    for args in _opcheck_cases(device)[op]:
        torch.library.opcheck(getattr(torch.ops.localvol, op).default, args)


# ---------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from localvol_fast.ops import compiled, reference

    def status(field):  # bytes, from /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def extra(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before

    rows, positions, vocab = 2, 4, 1 << 19
    logits = torch.empty(rows, positions, vocab).normal_()
    anchor = torch.empty(rows, positions, vocab).normal_()
    for n in range(rows):  # normalize row by row: no full-size temporary
        for t in range(positions):
            anchor[n, t] -= anchor[n, t].logsumexp(0)
    batch, n = 4, 1 << 20
    out = torch.zeros(batch, n)
    flat_anchor = torch.empty(n).normal_()
    scales = torch.full((batch,), 0.01, dtype=torch.float64)
    idx = torch.arange(batch)
    compiled.kl_against_anchor(logits[:, :, :64], anchor[:, :, :64])  # warm up the thread pool
    compiled.perturb_(out[:, :64], flat_anchor[:64], None, 1, idx, scales)
    result = {
        "kl": extra(lambda: compiled.kl_against_anchor(logits, anchor)),
        "perturb": extra(lambda: compiled.perturb_(out, flat_anchor, None, 1, idx, scales)),
        "kl_reference": extra(lambda: reference.kl_against_anchor(logits, anchor)),
        "perturb_reference": extra(lambda: reference.perturb_(out, flat_anchor, None, 1, idx, scales)),
        "kl_copy": logits.numel() * 4, "perturb_copy": out.numel() * 4,
    }
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not compiled.is_available("cpu"), reason=f"localvol CPU kernels not registered; {compiled.BUILD_HINT}")
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_kl_and_perturb_extra_memory_is_not_full_size():
    """Peak resident memory added by the CPU kernels, measured in a fresh process.

    Before each call the kernel's high-water mark (VmHWM) is reset to the current resident set, and a
    fixed mmap threshold makes glibc hand every large block back at once, so the peak follows the
    live data. The references run too, proving the measurement sees full-size temporaries; the
    kernels must add under 1/8 of one (N, T, V) or (B, n) float32 array (they add O(N T) and O(n)).
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    for op in ("kl", "perturb"):
        copy = m[f"{op}_copy"]
        assert m[f"{op}_reference"] > copy, m  # the method sees a full-size temporary
        assert m[op] < copy / 8, m


# ---------------------------------------------------------------- instruction-set paths

_ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from localvol_fast.ops import compiled
    x = torch.load(sys.argv[1])
    out = torch.empty(3, x["anchor"].numel())
    torch.save({
        "gaussian": compiled.gaussian(7, x["idx"], 3, 5003),
        "stats": compiled.direction_stats(7, x["idx"], x["anchor"], x["precond"], x["precond"], x["bounds"], 1),
        "perturb": compiled.perturb_(out, x["anchor"], x["precond"], 7, x["idx"], x["scales"], 1),
        "kl_small": compiled.kl_against_anchor(x["logits"], x["logits_anchor"]),
        "kl_big": compiled.kl_against_anchor(x["big"], x["big_anchor"]),
    }, sys.argv[2])
    """
)


@pytest.mark.skipif(not compiled.is_available("cpu"), reason=f"localvol CPU kernels not registered; {compiled.BUILD_HINT}")
def test_every_instruction_set_path_gives_the_same_bits(tmp_path):
    """The CPU kernels pick a default, AVX2 or AVX-512 path at run time (ATEN_CPU_CAPABILITY caps it, as
    for torch); the paths must agree bit for bit. Paths the CPU lacks fall back to narrower ones. The
    inputs are made here and loaded by each child: torch's own kernels (randn, log_softmax) do differ."""
    gen = torch.Generator().manual_seed(3)
    logits, big = torch.randn(6, 37, 10, generator=gen) * 4, torch.randn(2, 3, 3001, generator=gen) * 4
    inputs = {
        "idx": torch.tensor([0, 5, 2**40 + 3]),
        "anchor": torch.randn(5003, generator=gen),
        "precond": torch.rand(5003, generator=gen) + 0.5,
        "bounds": torch.rand(5003, generator=gen) + 1,
        "scales": torch.tensor([0.1, 2.0, 3e-3], dtype=torch.float64),
        "logits": logits,
        "logits_anchor": torch.log_softmax(logits.roll(1, 0), -1),
        "big": big,
        "big_anchor": torch.log_softmax(big.roll(1, 0), -1),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    results = {}
    for capability in ("default", "avx2", "avx512"):
        path = tmp_path / f"{capability}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "inputs.pt"), str(path)], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        results[capability] = torch.load(path)
    for capability in ("avx2", "avx512"):
        for name, value in results["default"].items():
            assert torch.equal(results[capability][name], value), (capability, name)


# ---------------------------------------------------------------- without the extension


def test_missing_extension_warns_once_with_build_hint():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["localvol_fast._C"] = None  # as if it was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import localvol_fast.ops.compiled as compiled
            import localvol_fast.ops.compiled
        mine = [str(w.message) for w in caught if "localvol_fast._C" in str(w.message)]
        assert len(mine) == 1 and "pip install --no-build-isolation -e ." in mine[0], mine
        assert not compiled.is_available("cpu") and not compiled.is_available("cuda")
        try:
            compiled.gaussian(0, [0], 0, 3)
        except RuntimeError as error:
            assert "pip install --no-build-isolation -e ." in str(error)
        else:
            raise AssertionError("no error without the extension")
        from localvol_fast.ops import reference
        assert reference.gaussian(0, __import__("torch").tensor([0]), 0, 3).shape == (1, 3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_is_available_asks_the_dispatcher():
    """Registered kernels, not hardware: a CUDA build answers True for "cuda" even without a GPU."""
    registered = torch._C._dispatch_has_kernel_for_dispatch_key
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        expected = compiled._C is not None and registered("localvol::gaussian", key)
        assert compiled.is_available(device_type) == expected
    with pytest.raises(ValueError, match="device_type"):
        compiled.is_available("tpu")
