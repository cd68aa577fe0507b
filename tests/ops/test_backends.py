"""Every backend runs the whole inner loop and gives the same estimates (issue: fused kernels)."""

import warnings

import pytest
import torch
from conftest import tiny_gpt_neox, token_batch

import localvol_fast as lv
from localvol_fast.apps.digits import PRIOR_SIGMA
from localvol_fast.ops import available_backends, get_backend

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]


def test_reference_is_always_available_and_auto_picks_a_real_backend():
    assert "reference" in available_backends()
    auto = get_backend("auto", "cpu")
    expected = "cpu" if "cpu" in available_backends("cpu") else "reference"
    assert auto.name == expected
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("fortran", "cpu")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        get_backend("cuda", "cpu")


def test_compiled_cpu_backend_is_built_here():
    # CI builds the extension; a missing build must fail loudly here rather than skip every comparison.
    assert "cpu" in available_backends("cpu"), "the compiled extension is not built: pip install --no-build-isolation -e ."


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_estimate_volume_agrees_across_backends(backend):
    dim = 301
    h = torch.logspace(-2, 2, dim, dtype=torch.float64)
    anchor = torch.linspace(-1, 1, dim, dtype=torch.float64)
    cost = lambda th: 0.5 * ((th.double() - anchor) ** 2 * h).sum(1) * (1 + 0.1 * (th.double() - anchor).sum(1) ** 2)  # noqa: E731
    kw = dict(cutoff=1e-2, n_samples=6, sigma=0.7, preconditioner=h**-0.25, seed=11)
    ref = lv.estimate_volume(cost, anchor, backend="reference", **kw)
    other = lv.estimate_volume(cost, anchor, backend=backend, **kw)
    assert other.config["backend"] == backend
    # The Gaussians differ by float32 ulps between backends: estimates agree to D * 1e-6 nats.
    torch.testing.assert_close(other.props, ref.props, rtol=1e-6, atol=0)
    torch.testing.assert_close(other.estimates, ref.estimates, rtol=0, atol=dim * 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_digits_mlp_agrees_across_backends(digits_clean, backend):
    run = digits_clean
    kw = dict(cutoff=1e-2, n_samples=3, sigma=PRIOR_SIGMA, progress=False, seed=2)
    ref = _quiet(lv.estimate, run.model, run.x_test[:200], backend="reference", **kw)
    other = _quiet(lv.estimate, run.model, run.x_test[:200], backend=backend, **kw)
    assert other.config["backend"] == backend
    # Triton evaluates the MLP with its fused perturbed-linear kernel; the others factor the first layer.
    assert other.info["evaluation"] == ("fused-triton" if backend == "triton" else "mlp")
    torch.testing.assert_close(other.radii, ref.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(other.estimates, ref.estimates, rtol=0, atol=4810 * 1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_gpt_neox_agrees_across_backends(backend):
    model = tiny_gpt_neox()
    ids, mask = token_batch(rows=2, length=6)
    data = {"input_ids": ids, "attention_mask": mask}
    kw = dict(cutoff=1e-3, n_samples=2, sigma=0.5, progress=False, seed=1)
    ref = _quiet(lv.estimate, model, data, backend="reference", **kw)
    other = _quiet(lv.estimate, model, data, backend=backend, **kw)
    assert ref.status == ["converged"] * 2
    torch.testing.assert_close(other.radii, ref.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(other.estimates, ref.estimates, rtol=0, atol=ref.dim * 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_agree_with_the_reference(digits_clean, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on this GPU machine")
    run = digits_clean
    model = run.model.cuda()
    try:
        kw = dict(cutoff=1e-2, n_samples=8, sigma=PRIOR_SIGMA, progress=False, seed=2)
        ref = _quiet(lv.estimate, model, run.x_test.cuda(), backend="reference", **kw)
        other = _quiet(lv.estimate, model, run.x_test.cuda(), backend=backend, **kw)
    finally:
        run.model.cpu()
    torch.testing.assert_close(other.radii, ref.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(other.estimates, ref.estimates, rtol=0, atol=4810 * 1e-4)
