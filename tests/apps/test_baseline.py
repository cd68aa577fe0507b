"""The benchmarks' baseline (``localvol_fast.apps.baseline``): tyche's search schedule, its cost, its estimates.

Also a smoke run of ``bench/compare.py --tiny`` writing its markdown and JSON.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_neox, token_batch

from localvol_fast import estimate, gaussian_directions
from localvol_fast.apps.baseline import baseline_estimate, faithful_search

EPS = 1e-2
REPO = Path(__file__).resolve().parents[2]


def quadratic(crossing: float):
    """C(m) = eps (m / crossing)^2: the cutoff is reached at m = crossing."""
    return lambda m: EPS * (m / crossing) ** 2


# ----- the search schedule --------------------------------------------------------------------------
def test_schedule_is_tyches_doubling_then_bisection():
    out = faithful_search(quadratic(3.1), EPS, rtol=1e-2)
    # m = 1, the centre, m = 1 again (tyche's first loop iteration), doubling, then bisection of [2, 4].
    assert out["probes"][:6] == [1.0, 0.0, 1.0, 2.0, 4.0, 3.0]
    assert out["probes"][6:] == [3.5, 3.25, 3.125, 3.0625, 3.09375]
    assert out["status"] == "converged" and out["evals"] == len(out["probes"]) == 11
    # The accepted probe, not the next midpoint tyche would return.
    assert out["mult"] == out["probes"][-1] == 3.09375
    assert abs(out["delta"] - EPS) <= 1e-2 * EPS


def test_without_extra_calls_the_same_probes_minus_centre_and_repeat():
    full = faithful_search(quadratic(3.1), EPS, rtol=1e-2)
    lean = faithful_search(quadratic(3.1), EPS, rtol=1e-2, extra_calls=False)
    assert lean["probes"] == [1.0] + full["probes"][3:]
    assert lean["evals"] == full["evals"] - 2 and lean["mult"] == full["mult"]
    assert lean["iterations"] == full["iterations"]  # its first iteration reuses the first probe


def test_first_probe_accepted_and_bisection_below_one():
    out = faithful_search(quadratic(1.0), EPS)
    assert out["probes"] == [1.0, 0.0] and out["iterations"] == 0 and out["status"] == "converged"
    out = faithful_search(quadratic(0.3), EPS)  # above eps at m = 1: bisect down from [0, 1]
    assert out["probes"][:5] == [1.0, 0.0, 1.0, 0.5, 0.25]
    assert out["status"] == "converged" and abs(out["mult"] - 0.3) / 0.3 < 1e-2


def test_centre_cost_is_subtracted_like_tyche():
    offset = 0.5 * EPS  # a cost with C(centre) != 0: tyche's delta is C(m) - C(centre)
    out = faithful_search(lambda m: offset + quadratic(2.0)(m), EPS)
    assert out["status"] == "converged" and abs(out["mult"] - 2.0) / 2.0 < 1e-2


def test_unbounded_nonfinite_and_budget():
    out = faithful_search(lambda m: 0.0, EPS, max_iters=5)
    assert out["status"] == "unbounded" and out["probes"] == [1.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    out = faithful_search(lambda m: math.nan if m > 3 else quadratic(10.0)(m), EPS)
    assert out["status"] == "nonfinite" and out["mult"] == 4.0
    out = faithful_search(lambda m: 2 * EPS if m >= 1.5 else 0.5 * EPS, EPS, max_iters=30)  # a jump
    assert out["status"] == "not_converged" and out["iterations"] == 30


# ----- on models ------------------------------------------------------------------------------------
def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def kl_cost(model, x, theta):
    """mean over rows of KL(anchor || theta), written out independently of the baseline."""
    other = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, other.parameters())
    with torch.no_grad():
        p = torch.log_softmax(model(x).double(), -1)
        q = torch.log_softmax(other(x).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_radii_meet_the_tolerance_and_forward_passes_are_counted():
    model, x = tiny_mlp()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    out = baseline_estimate(model, x, cutoff=EPS, n_samples=6, sigma=1.0, seed=3)
    n_calls = len(calls)
    assert out["status"] == ["converged"] * 6 and out["dim"] == anchor.numel()
    g = gaussian_directions(3, torch.arange(6), anchor.numel()).double()
    for k in range(6):
        theta = anchor.double() + out["radii"][k] * g[k] / g[k].norm()
        assert abs(kl_cost(model, x, theta.float()) - EPS) <= 1.05e-2 * EPS
    # Default: the anchor's forward pass in every evaluation (tyche's CausalLMEstimator, cache_mode=None).
    assert torch.equal(out["forward_passes"], 2 * out["evals"])
    assert out["setup_forward_passes"] == 0 and n_calls == int(out["forward_passes"].sum())
    assert bool((out["evals"] >= 2).all())
    calls.clear()
    cached = baseline_estimate(model, x, cutoff=EPS, n_samples=6, sigma=1.0, seed=3, anchor_cache=True)
    assert torch.equal(cached["forward_passes"], cached["evals"]) and cached["setup_forward_passes"] == 1
    assert len(calls) == 1 + int(cached["forward_passes"].sum())
    assert torch.equal(cached["radii"], out["radii"])
    assert model.training  # modes restored


@pytest.mark.parametrize("preconditioned", [False, True], ids=["isotropic", "preconditioned"])
def test_estimates_agree_with_estimate_within_d_rtol(preconditioned):
    model, x = tiny_mlp(1)
    dim = sum(p.numel() for p in model.parameters())
    precond = None
    if preconditioned:
        precond = torch.exp(torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5)
    rtol = 1e-2
    ours = estimate(
        model,
        x,
        cutoff=EPS,
        n_samples=16,
        sigma=0.5,
        seed=7,
        rtol=1e-4,
        backend="reference",
        preconditioner=precond,
        progress=False,
    )
    base = baseline_estimate(model, x, cutoff=EPS, n_samples=16, sigma=0.5, seed=7, rtol=rtol, preconditioner=precond)
    assert ours.status == ["converged"] * 16 and base["status"] == ["converged"] * 16
    assert torch.equal(ours.indices, base["indices"])
    assert torch.allclose(ours.props, base["props"], rtol=1e-6)
    assert float((ours.radii / base["radii"] - 1).abs().max()) <= rtol
    assert float((ours.estimates - base["estimates"]).abs().max()) <= dim * rtol


def test_padded_language_model_agrees_with_estimate():
    model = tiny_gpt_neox()
    ids, mask = token_batch(rows=3, length=10)
    data = {"input_ids": ids, "attention_mask": mask}
    # sigma 0.1: the Gaussian's reach (about sigma sqrt(D) = 8) lies beyond every crossing (radius ~2)
    ours = estimate(
        model, data, cutoff=EPS, n_samples=4, sigma=0.1, seed=0, rtol=1e-4, backend="reference", progress=False
    )
    base = baseline_estimate(model, data, cutoff=EPS, n_samples=4, sigma=0.1, seed=0)
    assert ours.status == ["converged"] * 4 and base["status"] == ["converged"] * 4
    assert float((ours.radii / base["radii"] - 1).abs().max()) <= 1e-2
    assert float((ours.estimates - base["estimates"]).abs().max()) <= ours.dim * 1e-2


def test_rejects_bad_options():
    model, x = tiny_mlp()
    with pytest.raises(ValueError, match="cutoff"):
        baseline_estimate(model, x, cutoff=0.0, n_samples=2)
    with pytest.raises(ValueError, match="n_samples"):
        baseline_estimate(model, x, n_samples=0)
    with pytest.raises(ValueError, match="preconditioner"):
        baseline_estimate(model, x, n_samples=1, preconditioner=torch.ones(3))


# ----- bench/compare.py -----------------------------------------------------------------------------
def test_compare_tiny_writes_markdown_and_json(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--tiny", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "compare.json").read_text())
    machine = report["machine"]
    for key in ("cpu", "cores", "torch", "python", "backends", "torch_threads", "date", "git_commit"):
        assert key in machine
    assert "reference" in machine["backends"]
    (model,) = report["models"]
    methods = [row["method"] for row in model["rows"]]
    assert methods == ["baseline", "ours-reference", "ours-default"]
    for row in model["rows"]:
        assert row["directions"] == 8 and set(row["forward_passes_per_direction"]) == {"mean", "median", "p90", "max"}
        assert row["max_abs_estimate_difference"] <= row["d_times_rtol"]
    assert "available" in model["model"]["multi_cutoff"]
    text = (tmp_path / "compare.md").read_text()
    assert "| digits_mlp | 4,810 | baseline |" in text and "speedup vs baseline" in text
