"""On a GPU, a search round waits for the device once: when its costs come back to the host.

Every evaluation runs under ``torch.cuda.set_sync_debug_mode("error")``, which turns any operation that
makes the host wait for the device (``.item()``, a blocking copy, boolean indexing ...) into an error.
The models here are ours: a user's model may synchronize in its own forward pass (Hugging Face's
attention-mask checks do), which no evaluator can prevent.
"""

import pytest
import torch

from localvol_fast import estimate, estimate_volume
from localvol_fast.engine import estimator as volume

pytestmark = pytest.mark.gpu

QUIET = {"progress": False}


@pytest.fixture
def evaluations_must_not_wait(monkeypatch):
    """Wraps every evaluation of every search in the strict mode; returns the count of evaluations."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    real_search = volume.search_radii
    calls = {"evaluations": 0}

    def search(evaluate, *args, **kwargs):
        def strict(rows, radii):
            calls["evaluations"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return evaluate(rows, radii)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return real_search(strict, *args, **kwargs)

    monkeypatch.setattr(volume, "search_radii", search)
    return calls


def _assert_converged(result, calls, n_samples):
    assert calls["evaluations"] > 0
    assert result.n_samples == n_samples
    assert result.status_counts().get("converged", 0) == n_samples


@pytest.mark.parametrize(
    "evaluation, backend",
    [("vmap", "auto"), ("vmap", "triton"), ("sequential", "auto"), ("inplace", "auto")],
)
def test_model_evaluations_never_wait_for_the_gpu(digits_clean, evaluations_must_not_wait, evaluation, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = digits_clean.model.cuda()
    try:
        result = estimate(
            model, digits_clean.x_test.cuda(), n_samples=6, sigma=1.0, evaluation=evaluation, backend=backend, **QUIET
        )
    finally:
        digits_clean.model.cpu()
    _assert_converged(result, evaluations_must_not_wait, 6)


@pytest.mark.parametrize("anchor_cache", ["cpu", "recompute"])
def test_anchor_outputs_off_the_device_never_make_a_round_wait(digits_clean, evaluations_must_not_wait, anchor_cache):
    # A layer norm keeps the model off the plain-MLP path: the generic vmapped forward runs.
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), digits_clean.model).cuda()
    try:
        result = estimate(model, digits_clean.x_test.cuda(), n_samples=4, sigma=1.0, anchor_cache=anchor_cache, **QUIET)
    finally:
        digits_clean.model.cpu()
    _assert_converged(result, evaluations_must_not_wait, 4)


def test_a_cost_function_on_the_gpu_is_read_back_once_per_round(evaluations_must_not_wait):
    scales = torch.linspace(1.0, 3.0, 50, device="cuda", dtype=torch.float64)
    anchor = torch.zeros(50, device="cuda", dtype=torch.float64)

    def quadratic(points):  # an ellipsoid, on the device
        return 0.5 * ((points * scales) ** 2).sum(-1)

    result = estimate_volume(quadratic, anchor, cutoff=0.5, n_samples=8, sigma=1.0, **QUIET)
    _assert_converged(result, evaluations_must_not_wait, 8)
