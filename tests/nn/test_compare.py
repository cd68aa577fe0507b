"""``compare``: paired differences of two models' log volumes, for rays and the sequential method."""

import copy

import pytest
import torch

from localvol_fast.core.ground_truth import quadratic_log_volume
from localvol_fast.nn.compare import compare


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def _linear(scale, seed=0):
    """Linear map (D = 12) with MSE against its own outputs on inputs scaled by ``scale``: a quadratic loss
    whose Hessian grows with scale^2, so its exact volume shrinks."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    x = scale * torch.randn(20, 4, generator=g, dtype=torch.float64)
    gram = (2.0 / 60) * x.T @ x
    values, vectors = torch.linalg.eigh(torch.block_diag(gram, gram, gram))
    truth = quadratic_log_volume(values, vectors.T @ model.weight.detach().reshape(-1), cutoff=0.05, sigma=1.0)
    return model, (x, model(x).detach()), (values, vectors), truth.log_volume


OPTIONS = dict(neighborhood="loss", loss_fn=_mse, cutoff=0.05, sigma=1.0, progress=False, seed=4)


def test_a_model_against_its_copy_differs_by_exactly_zero_on_rays():
    model, data, _, _ = _linear(1.0)
    d = compare(model, copy.deepcopy(model), data, n_samples=64, **OPTIONS)
    assert d.difference == 0.0 and d.interval == (0.0, 0.0) and not d.excludes_zero


def test_the_paired_ray_difference_has_the_sign_of_the_true_difference():
    wide, wide_data, _, truth_wide = _linear(1.0)
    narrow, narrow_data, _, truth_narrow = _linear(1.6)
    d = compare(wide, narrow, wide_data, data_b=narrow_data, n_samples=256, **OPTIONS)
    assert truth_wide - truth_narrow > 3  # the problem is built so that the two differ
    assert d.difference > 0 and d.excludes_zero
    assert d.n_pairs == 256 and "rays" in d.method


def test_the_sequential_paired_interval_covers_the_true_difference():
    wide, wide_data, wide_eigen, truth_wide = _linear(1.0)
    narrow, narrow_data, narrow_eigen, truth_narrow = _linear(1.6)
    # curvature differs per model, so each side gets its own: compare is two estimates with shared options
    a = compare(wide, narrow, wide_data, data_b=narrow_data, method="sequential", n_samples=200, n_replicates=4,
                curvature="fisher", **OPTIONS)
    low, high = a.interval
    assert low <= truth_wide - truth_narrow <= high, (truth_wide - truth_narrow, a)
    assert a.n_pairs == 4 and "sequential" in a.method


def test_bad_calls_are_refused():
    model, data, _, _ = _linear(1.0)
    with pytest.raises(ValueError, match="optimizer_a"):
        compare(model, model, data, optimizer=None, **OPTIONS)
    with pytest.raises(ValueError, match="one cutoff"):
        compare(model, model, data, **{**OPTIONS, "cutoff": [0.01, 0.1]})
