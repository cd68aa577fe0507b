"""VolumeResult.from_dict / load check every field, and the summary of NaN or empty estimates reads."""

import json
import math

import pytest
import torch

from localvol_fast.core.result import VolumeResult
from localvol_fast.core.search import STATUS_NAMES


def _result(estimates, status=None):
    n = len(estimates)
    return VolumeResult(
        estimates=torch.tensor(estimates, dtype=torch.float64),
        radii=torch.full((n,), 0.5, dtype=torch.float64),
        deltas=torch.full((n,), 0.01, dtype=torch.float64),
        props=torch.ones(n, dtype=torch.float64),
        status=status or ["converged"] * n,
        n_evals=torch.full((n,), 5, dtype=torch.int64),
        indices=torch.arange(n, dtype=torch.int64),
        nonmonotone=torch.zeros(n, dtype=torch.bool),
        dim=12,
        cutoff=1e-2,
        measure={"name": "gaussian", "sigma": 1.0},
        config={"seed": 0},
        info={"notes": []},
    )


def _saved():
    return json.loads(json.dumps(_result([-3.0, -2.5, -4.0], status=["converged", "unbounded", "jump"]).to_dict()))


def test_a_valid_result_loads_back(tmp_path):
    back = VolumeResult.load(_result([-1.0, 2.0], status=list(STATUS_NAMES[:2])).save(tmp_path / "r.json"))
    assert back.n_samples == 2 and back.status == list(STATUS_NAMES[:2])
    empty = VolumeResult.from_dict(_result([]).to_dict())
    assert empty.n_samples == 0


BAD = [
    # (what to change, value, the message must say)
    ("format", "other", "not a saved VolumeResult"),
    ("version", 99, "format version 99"),
    ("version", None, "format version None"),
    ("estimates", [1.0, 2.0], "radii has 3 entries but estimates has 2"),
    ("estimates", "1,2,3", "estimates must be a list"),
    ("radii", [0.5, 0.5], "radii has 2 entries but estimates has 3"),
    ("radii", [[0.5], [0.5], [0.5]], r"radii\[0\] is \[0.5\]"),
    ("deltas", [0.1, "x", 0.1], r"deltas\[1\] is 'x'"),
    ("props", [1.0, None, 1.0], r"props\[1\] is None"),
    ("props", [1.0, True, 1.0], r"props\[1\] is True"),
    ("n_evals", [1, 2.5, 3], r"n_evals\[1\] is 2.5"),
    ("n_evals", [1, 2, 2**63], "int64"),
    ("indices", [0, 1], "indices has 2 entries"),
    ("nonmonotone", [0, 1, 0], r"nonmonotone\[0\] is 0.*booleans"),
    ("status", ["converged", "bogus", "jump"], "unknown|status names"),
    ("status", ["converged", "jump"], "status has 2 entries"),
    ("status", ["converged", 1, "jump"], r"status\[1\] is 1"),
    ("dim", 0, "dim must be a positive integer"),
    ("dim", 3.0, "dim must be a positive integer"),
    ("dim", True, "dim must be a positive integer"),
    ("cutoff", -1e-2, "cutoff must be a finite positive number"),
    ("cutoff", math.inf, "cutoff must be a finite positive number"),
    ("cutoff", math.nan, "cutoff must be a finite positive number"),
    ("cutoff", "0.01", "cutoff must be a finite positive number"),
    ("measure", "gaussian", "measure must be a JSON object"),
    ("config", [1], "config must be a JSON object"),
    ("info", None, "info must be a JSON object"),
]


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_every_invalid_field_is_named(name, value, message):
    data = _saved()
    data[name] = value
    with pytest.raises(ValueError, match=message):
        VolumeResult.from_dict(data)


@pytest.mark.parametrize("name", ["estimates", "status", "dim", "cutoff", "measure", "info"])
def test_a_missing_field_is_named(name):
    data = _saved()
    del data[name]
    with pytest.raises(ValueError, match=f"lacks the field.*'{name}'"):
        VolumeResult.from_dict(data)


def test_load_refuses_a_file_that_is_not_an_object(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="not a saved VolumeResult"):
        VolumeResult.load(path)


@pytest.mark.parametrize("estimates", [[math.nan] * 4, [], [math.nan, -math.inf], [-math.inf] * 3])
def test_summary_of_nan_or_empty_estimates_reads(estimates):
    r = _result(estimates)
    text = r.summary()
    assert "log volume" in text and "95% interval" in text
    low, high = r.log_volume_interval
    if all(math.isnan(e) for e in estimates):  # nothing to estimate from: nan figures, no error
        assert math.isnan(low) and math.isnan(high) and math.isnan(r.effective_sample_size)
        assert "nan" in text
