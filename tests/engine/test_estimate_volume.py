"""estimate_volume against ground truth: closed-form ellipsoids, brute-force Monte Carlo, exact limits."""

import math
import warnings

import pytest
import torch

from localvol_fast import estimate_volume, log_ball_volume


def _ellipsoid(dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.logspace(-3, 3, dim, dtype=torch.float64)  # six orders of magnitude
    anchor = torch.randn(dim, generator=gen, dtype=torch.float64)
    return h, anchor, (lambda th: 0.5 * ((th - anchor) ** 2 * h).sum(1))


def test_ellipsoid_with_exact_preconditioner_is_exact_per_direction():
    dim, eps = 1000, 1e-2
    h, anchor, cost = _ellipsoid(dim)
    truth = log_ball_volume(dim) + 0.5 * float(torch.log(2 * eps / h).sum())
    r = estimate_volume(cost, anchor, cutoff=eps, n_samples=24, measure="uniform", preconditioner=h**-0.5)
    assert r.status == ["converged"] * 24
    assert ((r.estimates - truth).abs() <= 1e-8 * abs(truth)).all()
    iso = estimate_volume(cost, anchor, cutoff=eps, n_samples=24, measure="uniform")
    assert iso.log_volume < truth and (iso.estimates < truth).all()


def _star_cost(anchor):
    """A non-quadratic cost, increasing along every ray from the anchor (so S is star-shaped)."""

    def cost(th):
        d = th - anchor
        rho2 = (d * d).sum(1)
        u0 = d[:, 0] / rho2.clamp_min(1e-300).sqrt()
        shape = 0.6 + u0**2 + 0.4 * torch.cos(3 * d[:, -1] / rho2.clamp_min(1e-300).sqrt())
        return rho2 * shape + 0.3 * rho2**2

    return cost


def _mean_and_se(values):
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


@pytest.mark.parametrize("dim", [2, 3, 4, 6])
def test_gaussian_measure_matches_monte_carlo(dim):
    gen = torch.Generator().manual_seed(dim)
    anchor = torch.linspace(-0.6, 0.5, dim, dtype=torch.float64)
    cost, eps, sigma = _star_cost(anchor), 0.3, 0.8
    r = estimate_volume(cost, anchor, cutoff=eps, n_samples=3000, sigma=sigma, seed=dim, batch_size=1000)
    ours, ours_se = _mean_and_se(torch.exp(r.estimates))
    samples = torch.randn(2_000_000, dim, generator=gen, dtype=torch.float64) * sigma
    inside = (cost(samples) <= eps).double()
    mc, mc_se = _mean_and_se(inside)
    assert abs(ours - mc) <= 4 * math.hypot(ours_se, mc_se), (ours, mc, ours_se, mc_se)
    assert abs(math.log(ours) - r.log_volume) < 1e-9


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_uniform_box_matches_monte_carlo(dim):
    gen = torch.Generator().manual_seed(10 + dim)
    anchor = torch.linspace(-0.7, 0.4, dim, dtype=torch.float64)
    cost, eps, half_width = _star_cost(anchor), 0.8, 1.0  # large eps: many rays leave the box first
    r = estimate_volume(cost, anchor, cutoff=eps, n_samples=3000, measure="uniform", bounds=half_width, seed=dim)
    assert "clipped" in r.status
    ours, ours_se = _mean_and_se(torch.exp(r.estimates))
    samples = (torch.rand(2_000_000, dim, generator=gen, dtype=torch.float64) * 2 - 1) * half_width
    mc, mc_se = _mean_and_se((cost(samples) <= eps).double())
    assert abs(ours - mc) <= 4 * math.hypot(ours_se, mc_se), (ours, mc, ours_se, mc_se)


def test_lebesgue_volume_matches_monte_carlo_in_a_bounding_box():
    dim, eps = 3, 0.3
    anchor = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)
    cost = _star_cost(anchor)
    r = estimate_volume(cost, anchor, cutoff=eps, n_samples=3000, measure="uniform")
    ours, ours_se = _mean_and_se(torch.exp(r.estimates))
    gen = torch.Generator().manual_seed(1)
    side = 2.0  # the neighborhood lies within |d_i| < 1 (rho^2 * 0.2 <= eps)
    samples = anchor + (torch.rand(2_000_000, dim, generator=gen, dtype=torch.float64) - 0.5) * side
    frac, frac_se = _mean_and_se((cost(samples) <= eps).double())
    assert abs(ours - frac * side**dim) <= 4 * math.hypot(ours_se, frac_se * side**dim)


def test_gaussian_with_no_boundary_has_probability_one():
    dim = 50
    anchor = torch.zeros(dim, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="unbounded"):
        r = estimate_volume(lambda th: 0 * th.sum(1), anchor, cutoff=1e-2, n_samples=5, sigma=0.3)
    assert r.status == ["unbounded"] * 5 and torch.isinf(r.radii).all()
    assert (r.estimates.abs() < 1e-10).all()  # every ray carries exactly its share of N(0, sigma^2 I)


def test_infinite_lebesgue_volume_is_reported_as_such():
    anchor = torch.ones(4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="infinite Lebesgue volume"):
        r = estimate_volume(lambda th: 0 * th.sum(1), anchor, cutoff=1e-2, n_samples=3, measure="uniform")
    assert r.log_volume == math.inf


def test_anchor_outside_the_box_has_probability_zero():
    anchor = torch.tensor([0.5, 2.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="outside the box"):
        r = estimate_volume(_star_cost(anchor), anchor, cutoff=0.1, n_samples=3, measure="uniform", bounds=1.0)
    assert r.log_volume == -math.inf
    assert "outside the box" in r.summary()


def test_same_seed_same_result_for_any_batch_size():
    h, anchor, cost = _ellipsoid(40, seed=3)
    runs = [
        estimate_volume(cost, anchor, cutoff=1e-2, n_samples=20, seed=5, batch_size=b, sigma=1.0) for b in (1, 7, 20)
    ]
    for other in runs[1:]:
        assert torch.equal(other.estimates, runs[0].estimates)
        assert torch.equal(other.n_evals, runs[0].n_evals)
    different = estimate_volume(cost, anchor, cutoff=1e-2, n_samples=20, seed=6, sigma=1.0)
    assert not torch.equal(different.estimates, runs[0].estimates)


def test_float32_anchor_and_progress_bar(capsys):
    h, anchor, cost = _ellipsoid(30)
    anchor32 = anchor.float()
    r = estimate_volume(
        lambda th: 0.5 * ((th.double() - anchor32.double()) ** 2 * h).sum(1),
        anchor32,
        cutoff=1e-2,
        n_samples=10,
        progress=True,
    )
    assert r.status == ["converged"] * 10 and math.isfinite(r.log_volume)
    assert "directions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cutoff": 0.0}, ValueError, "cutoff"),
        ({"cutoff": -1.0}, ValueError, "cutoff"),
        ({"cutoff": math.nan}, ValueError, "cutoff"),
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"measure": "cauchy"}, ValueError, "measure"),
        ({"sigma": -1.0}, ValueError, "sigma"),
        ({"sigma": torch.ones(3)}, ValueError, "sigma has 3 values"),
        ({"bounds": 1.0}, ValueError, "uniform"),
        ({"measure": "uniform", "bounds": torch.ones(2)}, ValueError, "bounds has 2 values"),
        ({"measure": "uniform", "bounds": 0.0}, ValueError, "bounds"),
        ({"preconditioner": torch.ones(3)}, ValueError, "preconditioner"),
        ({"preconditioner": -torch.ones(5)}, ValueError, "positive"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    anchor = torch.ones(5, dtype=torch.float64)
    args = {"cutoff": 1e-2, "n_samples": 2, **kwargs}
    with pytest.raises(error, match=match):
        estimate_volume(_star_cost(anchor), anchor, **args)


def test_bad_anchor_and_cost_functions():
    good = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN/inf"):
        estimate_volume(_star_cost(good), torch.tensor([1.0, math.nan, 0.0]), cutoff=1e-2, n_samples=2)
    with pytest.raises(TypeError, match="floating"):
        estimate_volume(_star_cost(good), torch.ones(3, dtype=torch.int64), cutoff=1e-2, n_samples=2)
    with pytest.raises(ValueError, match="must return"):
        estimate_volume(lambda th: th, good, cutoff=1e-2, n_samples=2)
    with pytest.raises(ValueError, match="0 at the anchor"):
        estimate_volume(lambda th: th.sum(1) ** 2 + 1.0, good, cutoff=1e-2, n_samples=2)
    with pytest.raises(TypeError, match="callable"):
        estimate_volume(None, good, cutoff=1e-2, n_samples=2)


def test_nan_costs_do_not_raise():
    anchor = torch.zeros(3, dtype=torch.float64)

    def cost(th):
        c = (th * th).sum(1)
        return torch.where(th[:, 0] > 0.01, torch.full_like(c, math.nan), c)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = estimate_volume(cost, anchor, cutoff=1.0, n_samples=16, sigma=1.0)
    assert set(r.status) <= {"converged", "nonfinite"} and "nonfinite" in r.status
    assert torch.isfinite(r.estimates).all()


def test_several_cutoffs_in_one_search_match_separate_searches():
    h, anchor, cost = _ellipsoid(200, seed=4)
    cutoffs = [1e-2, 1e-6, 1.0, 1e-4]
    kw = dict(n_samples=12, seed=3, measure="uniform", preconditioner=h**-0.5)
    together = estimate_volume(cost, anchor, cutoff=cutoffs, **kw)
    assert [r.cutoff for r in together] == cutoffs
    for eps, joint in zip(cutoffs, together):
        alone = estimate_volume(cost, anchor, cutoff=eps, **kw)
        truth = log_ball_volume(200) + 0.5 * float(torch.log(2 * eps / h).sum())
        assert joint.status == ["converged"] * 12
        torch.testing.assert_close(joint.estimates, torch.full_like(joint.estimates, truth), rtol=1e-8, atol=0)
        torch.testing.assert_close(joint.estimates, alone.estimates, rtol=1e-8, atol=0)
    # the quadratic cost gives each later cutoff's radius from the earlier ones almost for free
    assert sum(r.evals_per_direction for r in together) < 4 * 2.5
    with pytest.raises(ValueError, match="empty"):
        estimate_volume(cost, anchor, cutoff=[], **kw)
    with pytest.raises(ValueError, match="cutoff"):
        estimate_volume(cost, anchor, cutoff=[1e-2, -1.0], **kw)


@pytest.mark.parametrize(
    "measure, status", [({"sigma": 1.0}, "unbounded"), ({"measure": "uniform", "bounds": 3.0}, "clipped")]
)
def test_a_cutoff_most_rays_never_reach_costs_one_probe_after_the_pilot(measure, status):
    """A saturating cost (at most 0.5) never reaches the cutoff 1: once the pilot has seen that, every
    later direction is settled by one probe at the measure's reach (the Gaussian's tail, the box's wall)
    instead of a guess and then the reach."""
    anchor = torch.zeros(50, dtype=torch.float64)
    cost = lambda th: 0.5 * torch.tanh((th.double() ** 2).sum(1))  # noqa: E731
    with pytest.warns(RuntimeWarning, match=status):
        low, high = estimate_volume(cost, anchor, cutoff=[1e-2, 1.0], n_samples=40, seed=1, **measure)
    assert set(low.status) == {"converged"} and set(high.status) == {status}
    later = high.indices >= 8
    assert torch.equal(high.n_evals[later], torch.ones(int(later.sum()), dtype=high.n_evals.dtype))


def test_info_splits_the_time_between_evaluations_and_the_search():
    h, anchor, cost = _ellipsoid(30, seed=2)
    r = estimate_volume(cost, anchor, cutoff=1e-2, n_samples=12, sigma=1.0, seed=0, batch_size=4)
    # one evaluation call per round; at least one round per batch (12 directions, pilot of 8, batches of 4)
    assert r.info["search_rounds"] >= 3 and r.info["search_rounds"] <= int(r.n_evals.sum())
    assert 0 < r.info["seconds_evaluating"] <= r.info["seconds"]
