"""Paired differences of log volumes: exact on shifted estimates, narrower than unpaired, and coverage."""

import math

import pytest
import torch

from localvol_fast.core.comparison import paired_ray_difference, paired_replicate_difference
from localvol_fast.core.result import VolumeResult
from localvol_fast.core.statistics import t_quantile


def _result(estimates, indices=None, cutoff=1e-2):
    estimates = torch.as_tensor(estimates, dtype=torch.float64)
    n = estimates.numel()
    return VolumeResult(
        estimates=estimates, radii=torch.ones(n, dtype=torch.float64), deltas=torch.zeros(n, dtype=torch.float64),
        props=torch.ones(n, dtype=torch.float64), status=["converged"] * n, n_evals=torch.ones(n, dtype=torch.int64),
        indices=torch.arange(n, dtype=torch.int64) if indices is None else indices,
        nonmonotone=torch.zeros(n, dtype=torch.bool), dim=10, cutoff=cutoff, measure={"name": "gaussian"},
    )


def test_a_constant_shift_is_recovered_exactly_with_a_zero_width_interval():
    e = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    d = paired_ray_difference(_result(e + 7.25), _result(e))
    assert abs(d.difference - 7.25) < 1e-9
    assert abs(d.interval[0] - 7.25) < 1e-9 and abs(d.interval[1] - 7.25) < 1e-9
    assert d.excludes_zero and abs(d.log10_difference - 7.25 / math.log(10)) < 1e-12


def test_pairing_narrows_the_interval_of_correlated_estimates():
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(400, generator=g, dtype=torch.float64) * 3
    a = shared + 0.3 * torch.randn(400, generator=g, dtype=torch.float64)
    b = shared + 0.3 * torch.randn(400, generator=g, dtype=torch.float64) - 1.0
    paired = paired_ray_difference(_result(a), _result(b))
    ra, rb = _result(a), _result(b)
    (la, ha), (lb, hb) = ra.log_volume_interval, rb.log_volume_interval
    unpaired_width = math.hypot(ha - la, hb - lb)
    assert paired.interval[1] - paired.interval[0] < 0.5 * unpaired_width
    assert paired.interval[0] < paired.difference < paired.interval[1]


def test_the_paired_bootstrap_covers_the_true_difference_about_95_percent():
    # Per-direction weights w = exp(e) with e ~ N(0, 1): E[w] = e^{1/2}; b's weights are a's times
    # exp(noise), noise ~ N(mu, 0.2^2), so the true difference is -(mu + 0.02).
    mu, hits, trials = -0.4, 0, 120
    truth = -(mu + 0.5 * 0.2**2)
    for k in range(trials):
        g = torch.Generator().manual_seed(100 + k)
        e = torch.randn(300, generator=g, dtype=torch.float64)
        noise = mu + 0.2 * torch.randn(300, generator=g, dtype=torch.float64)
        d = paired_ray_difference(_result(e), _result(e + noise), n_resamples=400)
        hits += d.interval[0] <= truth <= d.interval[1]
    assert 0.87 * trials <= hits <= trials  # 95% nominal; 120 trials: 4 SE below is about 0.87


def test_unpaired_or_mismatched_results_are_refused():
    e = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="same directions"):
        paired_ray_difference(_result(e), _result(e, indices=torch.arange(5, 10)))
    with pytest.raises(ValueError, match="cutoff"):
        paired_ray_difference(_result(e), _result(e, cutoff=0.1))
    with pytest.raises(TypeError, match="VolumeResult"):
        paired_ray_difference(_result(e), [0.0])
    with pytest.raises(ValueError, match="level"):
        paired_ray_difference(_result(e), _result(e), level=1.5)


def test_replicate_difference_is_a_t_interval_of_the_pairwise_differences():
    a = torch.tensor([-10.0, -11.0, -9.5, -10.5], dtype=torch.float64)
    b = a - 2.0 + torch.tensor([0.1, -0.1, 0.2, -0.2], dtype=torch.float64)
    d = paired_replicate_difference(a, b, log_volume_a=-10.2, log_volume_b=-12.2, method="sequential")
    diffs = a - b
    half = t_quantile(0.95, 3) * float(diffs.std()) / 2.0
    assert abs(t_quantile(0.95, 3) - 3.182) < 1e-3
    assert abs(d.difference - 2.0) < 1e-12 and abs((d.interval[1] - d.interval[0]) / 2 - half) < 1e-12
    with pytest.raises(ValueError, match="replicates"):
        paired_replicate_difference(a, b[:3], log_volume_a=0.0, log_volume_b=0.0, method="x")
