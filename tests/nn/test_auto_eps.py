"""``preconditioner_eps="auto"`` (``nn.auto_eps``): the choice on problems whose best eps is known, the
pilot's directions kept apart from the estimate's, and the wiring through ``estimate`` and the CLI."""

import math

import pytest
import torch
from conftest import assert_restored, snapshot

import localvol_fast as lv
from localvol_fast.apps import cli
from localvol_fast.core.philox import gaussian_directions
from localvol_fast.nn.auto_eps import (
    DEFAULT_EPS_GRID, choose_preconditioner_eps, pilot_score, pilot_seed,
)

QUIET = {"progress": False}


def _quadratic(curvature):
    """C(theta) = 1/2 sum_i h_i theta_i^2 about the anchor 0: with the uniform (Lebesgue) measure the
    preconditioner P = H^(-1/2) makes every direction's estimate the exact log volume."""
    h = curvature.double()
    return lambda theta: 0.5 * (theta.double().square() * h).sum(-1)


def _pilot_on(fn, dim, cutoff=1e-2):
    anchor = torch.zeros(dim, dtype=torch.float64)
    return lambda p, n, seed: lv.estimate_volume(
        fn, anchor, cutoff=cutoff, n_samples=n, measure="uniform", preconditioner=p, seed=seed,
    )


def test_exact_family_picks_the_smallest_eps():
    # sqrt(h) spans 1e-6 .. 10: each smaller grid eps resolves one more decade of h, so 1e-5 is best.
    root = torch.logspace(-6, 1, 56, dtype=torch.float64)
    family = lambda eps: 1.0 / (root + eps)  # eps -> 0 is the exact H^(-1/2)
    chosen, choice = choose_preconditioner_eps(family, _pilot_on(_quadratic(root.square()), 56), seed=3, pilot_directions=32)
    assert chosen == 1e-5 == min(DEFAULT_EPS_GRID)
    medians = [f["median"] for f in choice["per_eps"]]
    assert medians == sorted(medians)  # larger eps are measurably worse, monotonically
    assert medians[-1] - medians[0] > 10.0


def test_zero_raw_values_make_a_middle_eps_best():
    # Raw values s = sqrt(v) in [1e3, 1e4], except 12 "always-blank" coordinates with s = 0 whose true
    # sqrt(curvature) is 0.1. p = 1/(s + eps) is then exact to 1e-4 relative at eps = 0.1 and off by a
    # factor of 10 or more on the blank coordinates at every other grid eps: 1e-1 is the best grid value.
    s = torch.logspace(3, 4, 40, dtype=torch.float64)
    s[::4] = 0.0
    truth = torch.where(s > 0, s, torch.full_like(s, 0.1))
    family = lambda eps: 1.0 / (s + eps)
    chosen, choice = choose_preconditioner_eps(family, _pilot_on(_quadratic(truth.square()), 40), seed=0, pilot_directions=32)
    assert chosen == 1e-1
    best = choice["per_eps"][DEFAULT_EPS_GRID.index(1e-1)]
    exact = lv.estimate_volume(_quadratic(truth.square()), torch.zeros(40, dtype=torch.float64), cutoff=1e-2,
                               n_samples=4, measure="uniform", preconditioner=1.0 / truth)
    assert abs(best["median"] - float(exact.estimates[0])) < 0.05  # near exact, as the analysis says
    assert all(f["median"] < best["median"] - 1.0 for f in choice["per_eps"] if f is not best)


def test_pilot_seed_is_never_the_run_seed():
    for seed in (0, 1, 42, 2**63, 2**64 - 1):
        assert pilot_seed(seed) != seed and 0 <= pilot_seed(seed) < 2**64
        assert pilot_seed(pilot_seed(seed)) == seed  # a bijection: distinct runs get distinct pilots


def test_pilot_score_criteria():
    values = torch.tensor([0.0, 1.0, 2.0, math.nan, 100.0], dtype=torch.float64)
    assert pilot_score(values, "median") == 1.0  # NaN (a failed direction) ranks as -inf, not ignored
    assert pilot_score(values, "log-mean-exp") == pytest.approx(100.0 - math.log(5))
    assert pilot_score(values, "trimmed") < 3.0  # the largest 10% (the 100) left out
    with pytest.raises(ValueError, match="criterion"):
        pilot_score(values, "mean")


def _trained_mlp(seed=0):
    torch.manual_seed(seed)
    x = torch.rand(48, 6)
    x[:, 0] = 0.0  # an always-blank input: its first-layer weights get zero Adam moments
    y = torch.randint(0, 3, (48,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval(), optimizer, x


@pytest.mark.parametrize("name", ["adam", "fisher"])
def test_estimate_with_auto_eps(name):
    model, optimizer, x = _trained_mlp()
    snap = snapshot(model)
    common = {"preconditioner": name, "optimizer": optimizer if name == "adam" else None, "n_samples": 24, "seed": 5,
              "sigma": 1.0, "fisher_passes": 4, **QUIET}
    result = lv.estimate(model, x, preconditioner_eps="auto", **common)
    assert_restored(model, snap)
    info = result.info["preconditioner"]
    choice = info["eps_choice"]
    assert set(choice) >= {"grid", "pilot_directions", "pilot_seed", "per_eps", "chosen"}
    assert choice["grid"] == list(DEFAULT_EPS_GRID) and choice["pilot_seed"] == pilot_seed(5)
    assert info["eps"] == choice["chosen"] and info["name"] == name
    for f in choice["per_eps"]:
        assert set(f) >= {"eps", "log_volume", "median", "max", "effective_sample_size", "evaluations", "seconds"}
    # The estimate is exactly the run at the chosen eps with the user's seed: the pilot does not touch it.
    explicit = lv.estimate(model, x, preconditioner_eps=choice["chosen"], **common)
    assert torch.equal(result.estimates, explicit.estimates)
    assert torch.equal(result.indices, explicit.indices)


def test_pilot_directions_are_not_the_estimates():
    dim, seed, n = 83, 5, 24
    final = gaussian_directions(seed, range(n), dim)
    pilot = gaussian_directions(pilot_seed(seed), range(64), dim)
    cosines = (final / final.norm(dim=1, keepdim=True)) @ (pilot / pilot.norm(dim=1, keepdim=True)).T
    assert float(cosines.abs().max()) < 0.6  # independent streams: no pilot direction is a final one


@pytest.mark.parametrize("preconditioner", [None, "tensor"])
def test_auto_needs_a_named_preconditioner(preconditioner):
    model, _, x = _trained_mlp()
    if preconditioner == "tensor":
        preconditioner = torch.ones(sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match="preconditioner_eps='auto'"):
        lv.estimate(model, x, preconditioner=preconditioner, preconditioner_eps="auto", n_samples=4, **QUIET)
    with pytest.raises(TypeError, match="preconditioner_eps must be a number.*or 'auto'"):
        lv.estimate(model, x, preconditioner="fisher", preconditioner_eps="best", n_samples=4, **QUIET)


def test_cli_accepts_auto():
    parser = cli.build_parser()
    base = ["estimate", "--factory", "m:f", "--out", "r.json", "--preconditioner", "adam"]
    assert parser.parse_args([*base, "--preconditioner-eps", "auto"]).preconditioner_eps == "auto"
    assert parser.parse_args([*base, "--preconditioner-eps", "1e-3"]).preconditioner_eps == 1e-3
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--preconditioner-eps", "-1"])
