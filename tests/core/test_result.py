"""VolumeResult: derived figures and lossless JSON."""

import math

import pytest
import torch

from localvol_fast.core.result import VolumeResult, log_mean_exp


def _result(estimates, status=None):
    n = len(estimates)
    return VolumeResult(
        estimates=torch.tensor(estimates, dtype=torch.float64),
        radii=torch.linspace(0.1, 1.0, n, dtype=torch.float64) / 3,
        deltas=torch.full((n,), 0.01 * (1 + 1e-3), dtype=torch.float64),
        props=torch.full((n,), 1.0 / 3.0, dtype=torch.float64),
        status=status or ["converged"] * n,
        n_evals=torch.arange(n, dtype=torch.int64),
        indices=torch.arange(n, dtype=torch.int64),
        nonmonotone=torch.zeros(n, dtype=torch.bool),
        dim=4810,
        cutoff=1e-2,
        measure={"name": "gaussian", "sigma": 1 / math.sqrt(0.512)},
        config={"seed": 3},
        info={"notes": []},
    )


def test_log_volume_is_log_mean_exp():
    r = _result([-1000.0, -1001.0, -1003.5])
    expected = math.log((math.exp(0) + math.exp(-1) + math.exp(-3.5)) / 3) - 1000
    assert abs(r.log_volume - expected) < 1e-12
    assert abs(r.log10_volume - expected / math.log(10)) < 1e-12
    assert log_mean_exp(torch.tensor([-math.inf, -math.inf])) == -math.inf
    assert log_mean_exp(torch.tensor([0.0, math.inf])) == math.inf


def test_effective_sample_size():
    assert abs(_result([5.0] * 10).effective_sample_size - 10) < 1e-9
    assert abs(_result([0.0, -1000.0, -1000.0]).effective_sample_size - 1) < 1e-9


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    torch.manual_seed(0)
    r = _result((torch.randn(200) * 3 - 50).tolist())
    low, high = r.log_volume_interval
    assert low <= r.log_volume <= high
    assert r.interval(0.95) == (low, high)
    narrow = r.interval(0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(ValueError, match="level"):
        r.interval(1.5)


def test_json_round_trip_is_lossless(tmp_path):
    r = _result([-1e9 / 3, -math.inf, 2.0 / 7], status=["converged", "unbounded", "jump"])
    r.radii[1] = math.inf
    path = r.save(tmp_path / "sub" / "run.json")
    back = VolumeResult.load(path)
    for name in ("estimates", "radii", "deltas", "props", "n_evals", "indices", "nonmonotone"):
        a, b = getattr(r, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.status == r.status and back.measure == r.measure and back.config == r.config
    assert back.log_volume == r.log_volume
    assert "log volume" in back.summary()
    with pytest.raises(ValueError, match="not a saved"):
        VolumeResult.from_dict({"format": "other"})
