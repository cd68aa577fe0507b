"""``estimate(method="sequential")`` on models: against the exact volume of a quadratic loss, the curvature
choices, every evaluator, the model given back, checkpoints and resume, and the options it refuses."""

import math

import pytest
import torch

from conftest import assert_restored, snapshot
from localvol_fast.core.ground_truth import quadratic_log_volume
from localvol_fast.engine.sequential_result import SequentialResult
from localvol_fast.nn.estimator import estimate

SIGMA, CUTOFF = 1.0, 0.05


def _linear_problem(seed=0):
    """A bias-free linear map (D = 12) with MSE against its own anchor outputs: the loss neighborhood is
    exactly C = (1/2) d^T H d, H = I_3 (x) (2 / (3 N)) X^T X (row-major W), so its volume is known."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = model(x).detach()
    gram = (2.0 / (3 * x.shape[0])) * x.T @ x
    hessian = torch.block_diag(gram, gram, gram)
    values, vectors = torch.linalg.eigh(hessian)
    truth = quadratic_log_volume(values, vectors.T @ model.weight.detach().reshape(-1), cutoff=CUTOFF, sigma=SIGMA)
    return model, (x, y), hessian, (values, vectors), truth.log_volume


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def _run(model, data, **options):
    kwargs = dict(neighborhood="loss", loss_fn=_mse, cutoff=CUTOFF, sigma=SIGMA, method="sequential", n_samples=200,
                  n_replicates=4, progress=False, seed=1)
    return estimate(model, data, **{**kwargs, **options})


@pytest.mark.parametrize("curvature", ["exact", "diagonal", "fisher"])
def test_the_interval_covers_the_exact_volume_of_a_quadratic_loss(curvature):
    model, data, hessian, eigen, truth = _linear_problem()
    given = {"exact": eigen, "diagonal": torch.diagonal(hessian).clone(), "fisher": "fisher"}[curvature]
    before = snapshot(model)
    # A 95% interval from 4 replicates misses now and then (measured on this problem: 21-22 of 24 seeds
    # covered, mean gap -0.02 nats for both kernels), so three seeds, two of which must cover.
    covered = 0
    for seed in (1, 2, 3):
        result = _run(model, data, curvature=given, seed=seed)
        assert_restored(model, before)
        assert isinstance(result, SequentialResult) and result.complete
        low, high = result.log_volume_interval
        covered += low <= truth <= high
        assert abs(result.log_volume - truth) < 0.5, (curvature, seed, truth, result.log_volume, (low, high))
        assert high - low < 1.5  # the replicates agree to about a nat on this 12-parameter problem
        assert result.info["preconditioner"]["curvature"]["name"] == ("fisher" if curvature == "fisher" else "user")
        assert result.evaluations > 0 and result.info["forward_passes"] > 0
    assert covered >= 2, (curvature, truth)


def test_same_seed_same_numbers_and_another_seed_other_numbers():
    model, data, _, eigen, _ = _linear_problem()
    a, b = _run(model, data, curvature=eigen), _run(model, data, curvature=eigen)
    c = _run(model, data, curvature=eigen, seed=2)
    assert a.replicate_log_volumes == b.replicate_log_volumes
    assert a.replicate_log_volumes != c.replicate_log_volumes


def test_a_classifier_gets_the_exact_fisher_eigenbasis_and_every_evaluator_agrees():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = torch.randn(32, 5)
    before = snapshot(model)
    results = {
        mode: estimate(model, x, cutoff=1e-2, sigma=1.0, method="sequential", n_samples=150, n_replicates=3,
                       evaluation=mode, progress=False, seed=3)
        for mode in ("vmap", "sequential", "inplace")
    }
    assert_restored(model, before)
    for mode, r in results.items():
        assert r.info["preconditioner"]["curvature"]["name"] == "fisher-eigen", mode
        assert r.info["evaluation"] == ("mlp" if mode == "vmap" else mode)  # a plain MLP's vmap is its factored path
    # Costs from the evaluators differ only in float32 rounding; the samplers' decisions follow them.
    centre = results["vmap"]
    for mode in ("sequential", "inplace"):
        low, high = results[mode].log_volume_interval
        c_low, c_high = centre.log_volume_interval
        assert max(low, c_low) <= min(high, c_high), (mode, results[mode].log_volume, centre.log_volume)


def test_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    model, data, _, eigen, _ = _linear_problem()
    whole = _run(model, data, curvature=eigen)
    path = tmp_path / "run.pt"
    first = _run(model, data, curvature=eigen, output=path)
    assert path.exists() and first.replicate_log_volumes == whole.replicate_log_volumes
    with pytest.raises(ValueError, match="already holds a sequential run"):
        _run(model, data, curvature=eigen, output=path)
    again = _run(model, data, curvature=eigen, output=path, resume=True)  # finished: nothing left to do
    assert again.replicate_log_volumes == whole.replicate_log_volumes
    other, other_data, _, other_eigen, _ = _linear_problem(seed=5)
    with pytest.raises(ValueError, match="another run"):
        _run(other, other_data, curvature=other_eigen, output=path, resume=True)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"method": "mcmc"}, ValueError, "method"),
        ({"scope": "nearby"}, ValueError, "scope"),
        ({"curvature": "hessian"}, ValueError, "curvature"),
        ({"curvature": [1.0, 2.0]}, TypeError, "curvature"),
        ({"n_replicates": 0}, ValueError, "n_replicates"),
        ({"moves_per_step": 0}, ValueError, "moves_per_step"),
        ({"moves_per_step": 1.5}, ValueError, "moves_per_step"),
        ({"max_evaluations": -1}, ValueError, "max_evaluations"),
        ({"start_cutoff": 1e-3}, ValueError, "start_cutoff"),
        ({"start_cutoff": 1.0, "scope": "global"}, ValueError, "start_cutoff"),
        ({"start_cutoff": "wide"}, TypeError, "start_cutoff"),
        ({"preconditioner": "fisher"}, ValueError, "no preconditioner"),
        ({"measure": "uniform", "sigma": None, "bounds": 2.0}, ValueError, "Gaussian measure"),
        ({"sigma": torch.ones(12)}, ValueError, "scalar sigma"),
        ({"distributed": True}, ValueError, "does not shard"),
    ],
)
def test_options_the_sequential_method_cannot_take_are_refused(options, error, match):
    model, data, _, _, _ = _linear_problem()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        _run(model, data, **options)
    assert_restored(model, before)


def test_an_evaluation_budget_stops_the_run_and_says_so():
    model, data, _, eigen, _ = _linear_problem()
    budgeted = _run(model, data, curvature=eigen, n_samples=500, moves_per_step=3, start_cutoff=1.0, max_evaluations=3_000)
    assert budgeted.config["n_particles"] == 500 and budgeted.config["moves_per_step"] == 3 and not budgeted.complete
    assert budgeted.config["start_cutoff"] == 1.0
    assert math.isnan(budgeted.log_volume) and budgeted.evaluations <= 3_000
