"""The tempered-SMC estimator (``engine.sequential``) against exact ground truths on small problems."""

import math

import pytest
import torch

from localvol_fast.core.ground_truth import quadratic_log_volume
from localvol_fast.core.separable import separable_log_volume
from localvol_fast.engine.sequential import SequentialSampler, sequential_volume
from localvol_fast.engine.sequential_result import SequentialResult, replicate_interval, t_quantile


def _problem(dim: int, seed: int = 1):
    """A diagonal curvature with half its directions flat, and an anchor of unit scale."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(dim, generator=g, dtype=torch.float64) * 10
    lam = lam * (torch.rand(dim, generator=g, dtype=torch.float64) < 0.5)
    return lam, torch.randn(dim, generator=g, dtype=torch.float64)


def _separable_cost(lam, y0, kappa, vectors=None):
    def cost(theta):
        y = theta if vectors is None else theta @ vectors
        d = y - y0
        return (0.5 * lam * d**2 + kappa * d**4).sum(1)
    return cost


def _assert_near(result, truth: float, slack: float = 0.0, index: int = 0) -> None:
    """|estimate - truth| within twice the 95% interval's half-width (+ slack): a 95% interval misses 1 in
    20 by design, and each test is one seed; coverage itself is measured over seeds outside the tests."""
    low, high = result.intervals[index]
    half = 0.5 * (high - low)
    gap = result.log_volumes[index] - truth
    assert abs(gap) <= 2 * half + slack, (result.log_volumes[index], truth, (low, high))


def test_quadratic_bridge_is_exact_and_volume_within_interval():
    lam, y0 = _problem(40)
    cost = _separable_cost(lam, y0, 0.0)
    sampler = SequentialSampler(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=200, seed=3)
    sampler.advance()  # the bridge: C - C_q is rounding only, so one step with equal weights
    assert sampler.alpha == 1.0
    assert torch.allclose(sampler.log_z, torch.full_like(sampler.log_z, sampler.coords.log_normalizer(sampler.beta)), atol=1e-6)
    result = sampler.run()
    truth = quadratic_log_volume(lam.numpy(), y0.numpy(), cutoff=0.5, sigma=1.0, method="second-order").log_volume
    _assert_near(result, truth, slack=0.01)  # 0.01: the second-order saddlepoint's own error
    assert abs(result.log_volume - truth) < 0.5


def test_eigenbasis_with_complement_matches_the_rotated_diagonal():
    """Curvature on k < D orthonormal vectors: the rest of theta is carried beside y; the truth is the
    same problem in the eigenbasis."""
    dim, rank = 30, 12
    g = torch.Generator().manual_seed(5)
    vectors, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    lam = torch.rand(rank, generator=g, dtype=torch.float64) * 8 + 1
    anchor = torch.randn(dim, generator=g, dtype=torch.float64)
    y0 = vectors.T @ anchor
    cost = _separable_cost(lam, y0, 0.0, vectors)
    result = sequential_volume(cost, anchor, cutoff=0.3, sigma=1.0, curvature=(lam, vectors), n_particles=200, seed=0)
    truth = quadratic_log_volume(lam.numpy(), y0.numpy(), cutoff=0.3, sigma=1.0, method="second-order").log_volume
    _assert_near(result, truth, slack=0.01)


@pytest.mark.parametrize("kernel", ["hmc", "pcn"])
@pytest.mark.parametrize("kappa", [0.05, 0.5])
def test_quartic_within_interval_of_the_exact_volume(kappa, kernel):
    """Not exact by construction: the bridge from the quadratic surrogate and the moves do the work."""
    lam, y0 = _problem(40, seed=2)
    cost = _separable_cost(lam, y0, kappa)
    result = sequential_volume(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=200, seed=1, kernel=kernel)
    truth = separable_log_volume(lam.numpy(), y0.numpy(), cutoff=0.5, quartic=kappa, sigma=1.0).log_volume
    assert result.complete
    assert sum(s["phase"] == "bridge" for s in result.steps) > 1  # the bridge is not trivial here
    _assert_near(result, truth, slack=0.05)  # 0.05: the saddlepoint's error


def test_a_pilot_start_shortens_a_long_bridge_and_stays_exact_in_expectation():
    """A strong quartic on 60 flat directions: the bridge from the quadratic surrogate is long, so the
    main run starts from the Gaussian fitted to the pilot's landing population. Without landing moves, whose
    narrower interval would make this one seed's check of the start a check of the interval's width."""
    dim = 120
    lam, y0 = _problem(dim, seed=11)
    cost = _separable_cost(lam, y0, 2.0)
    truth = separable_log_volume(lam.numpy(), y0.numpy(), cutoff=0.5, quartic=2.0, sigma=1.0).log_volume
    options = dict(cutoff=0.5, sigma=1.0, curvature=lam, n_particles=100, seed=3, landing_moves=0)
    sampler = SequentialSampler(cost, y0, pilot_particles=64, **options)
    result = sampler.run()
    plain = sequential_volume(cost, y0, **options)
    pilot_steps = [s for s in result.steps if s["phase"].startswith("pilot")]
    main_bridge = [s for s in result.steps if s["phase"] == "bridge"]
    assert sampler.uses_pilot_start and len(pilot_steps) >= 10
    assert len(main_bridge) < sum(s["phase"] == "bridge" for s in plain.steps)
    assert result.evaluations > sampler.pilot.evaluations > 0  # the pilot's evaluations are counted in the total
    _assert_near(result, truth, slack=0.05)
    _assert_near(plain, truth, slack=0.05)


def test_landing_moves_average_the_last_step_down_and_stay_exact():
    """On a quadratic the start is exact, so the error is the last step's alone: one importance step from the
    tempered law to the cutoff (weights exp(beta C) 1{C <= c}, a few per cent effective). The landing moves
    average it over 30 more populations: over 8 seeds the gaps' spread falls by more than half (measured on
    40 seeds at N = 100: sd 0.115 without, 0.032 with; mean gaps -0.002 and -0.003; 38 and 39 of 40 covered)."""
    lam, y0 = _problem(100, seed=21)
    cost = _separable_cost(lam, y0, 0.0)
    truth = quadratic_log_volume(lam.numpy(), y0.numpy(), cutoff=0.5, sigma=1.0, method="lugannani-rice").log_volume
    gaps = {0: [], 30: []}
    for seed in range(8):
        for moves in gaps:
            result = sequential_volume(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=50, seed=seed,
                                       landing_moves=moves)
            gaps[moves].append(result.log_volume - truth)
            if moves:
                assert sum(s["phase"] == "landing" for s in result.steps) == 5  # 30 moves, 6 a step
                _assert_near(result, truth, slack=0.01)
    spread = {moves: float(torch.tensor(g).std()) for moves, g in gaps.items()}
    assert spread[30] < 0.5 * spread[0], spread
    assert abs(sum(gaps[30]) / 8) < 0.05


def test_a_scout_alone_chooses_the_steps_and_is_left_out_of_the_estimate():
    lam, y0 = _problem(40, seed=2)
    cost = _separable_cost(lam, y0, 0.5)
    truth = separable_log_volume(lam.numpy(), y0.numpy(), cutoff=0.5, quartic=0.5, sigma=1.0).log_volume
    options = dict(cutoff=0.5, sigma=1.0, curvature=lam, n_particles=100, seed=1, scout=True)
    sampler = SequentialSampler(cost, y0, **options)
    result = sampler.run()
    assert sampler.log_w.shape[0] == 5 and len(result.replicate_log_volumes[0]) == 4 and result.config["scout"]
    moves = [b["evaluations"] - a["evaluations"] for a, b in zip(result.steps, result.steps[1:])]
    assert set(moves) == {6 * 10 * 5 * 100}  # the scout is moved with the replicates, and counted
    _assert_near(result, truth, slack=0.05)
    # the step is the scout's: replicates whose weights would collapse do not shorten it
    increment = torch.zeros_like(sampler.cost)
    increment[1:] = 50.0 * torch.randn(increment[1:].shape, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)
    assert sampler._cess(increment) == pytest.approx(1.0)
    assert SequentialSampler(cost, y0, **{**options, "scout": False}).run().config["scout"] is False
    # resumed in the middle, it gives the uninterrupted result
    again = SequentialSampler(cost, y0, **options)
    for _ in range(4):
        again.advance()
    resumed = sequential_volume(cost, y0, state=again.state_dict(), **options)
    assert resumed.log_volumes == result.log_volumes


def test_a_short_pilot_bridge_keeps_the_surrogate_start():
    lam, y0 = _problem(30, seed=12)
    sampler = SequentialSampler(_separable_cost(lam, y0, 0.0), y0, cutoff=0.5, sigma=1.0, curvature=lam,
                                n_particles=64, pilot_particles=32, seed=0)
    sampler.run()
    assert sampler.pilot.done and not sampler.uses_pilot_start
    mean, var = sampler.coords.tempered_gaussian(sampler.coords.saddlepoint_beta(0.5))
    assert torch.equal(sampler.start_mean, mean) and torch.equal(sampler.start_var, var)


def test_a_given_gradient_is_used_instead_of_autograd():
    lam, y0 = _problem(20, seed=13)
    cost = _separable_cost(lam, y0, 0.1)
    calls = []

    def gradient(theta):
        d = theta - y0
        calls.append(theta.shape[0])
        return cost(theta), lam * d + 0.4 * d**3

    given = sequential_volume(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=64, seed=2, gradient=gradient)
    auto = sequential_volume(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=64, seed=2)
    assert sum(calls) == given.evaluations  # every evaluation went through it
    assert given.log_volume == pytest.approx(auto.log_volume, abs=1e-6)  # the same up to rounding


def test_hmc_refuses_a_cost_without_a_gradient():
    y0 = torch.zeros(5, dtype=torch.float64)

    def detached(theta):
        with torch.no_grad():
            return ((theta - y0) ** 2).sum(1)

    with pytest.raises(TypeError, match="kernel='pcn'"):
        sequential_volume(detached, y0, cutoff=0.5, sigma=1.0, curvature=torch.ones(5, dtype=torch.float64))
    result = sequential_volume(detached, y0, cutoff=0.5, sigma=1.0, curvature=torch.ones(5, dtype=torch.float64),
                               kernel="pcn", n_particles=32)
    assert result.complete


def test_several_cutoffs_and_the_curve():
    lam, y0 = _problem(30, seed=4)
    cost = _separable_cost(lam, y0, 0.1)
    cutoffs = [0.2, 1.0]
    result = sequential_volume(cost, y0, cutoff=cutoffs, sigma=1.0, curvature=lam, n_particles=200, seed=2)
    for index, c in enumerate(cutoffs):
        truth = separable_log_volume(lam.numpy(), y0.numpy(), cutoff=c, quartic=0.1, sigma=1.0).log_volume
        _assert_near(result, truth, slack=0.05, index=index)
    assert result.log_volumes[0] < result.log_volumes[1]
    assert result.curve_cutoffs == sorted(result.curve_cutoffs) and len(result.curve_cutoffs) >= 2
    assert min(result.curve_cutoffs) <= 0.2 * (1 + 1e-6) and max(result.curve_cutoffs) >= 1.0 * (1 - 1e-6)


def test_global_scope_from_the_prior():
    lam, y0 = _problem(10, seed=6)
    cost = _separable_cost(lam, y0, 0.0)
    result = sequential_volume(cost, y0, cutoff=1.0, sigma=1.0, scope="global", n_particles=300, seed=0)
    truth = quadratic_log_volume(lam.numpy(), y0.numpy(), cutoff=1.0, sigma=1.0, method="second-order").log_volume
    assert result.steps[0]["alpha"] == 1.0 and result.steps[0]["phase"] == "temper"
    _assert_near(result, truth, slack=0.01)


BANANA_ANCHOR = torch.tensor([0.5, -0.3], dtype=torch.float64)


def _banana(theta):
    """A neighborhood bent along u2 = -6 u1^2 (u = theta - anchor), 0.07 wide across and about 3 long: its
    quadratic surrogate at the anchor, diag(1/25, 4), is the straight middle part only."""
    u = theta - BANANA_ANCHOR
    return 0.5 * ((u[:, 0] / 5) ** 2 + ((u[:, 1] + 6 * u[:, 0] ** 2) / 0.5) ** 2)


def test_a_wider_start_reaches_the_arms_of_a_bent_neighborhood():
    # Monte Carlo truth: P(C <= 0.01) for theta ~ N(0, I), about 27 k hits in 2 M draws (SE ~0.006 nats)
    g = torch.Generator().manual_seed(0)
    hits = sum(int((_banana(torch.randn(500_000, 2, generator=g, dtype=torch.float64)) <= 0.01).sum()) for _ in range(4))
    truth, se = math.log(hits / 2_000_000), 1 / math.sqrt(hits)
    curvature = torch.tensor([1 / 25, 4.0], dtype=torch.float64)
    wide = sequential_volume(_banana, BANANA_ANCHOR, cutoff=0.01, sigma=1.0, curvature=curvature, n_particles=200,
                             start_cutoff=1.0, seed=0)
    low, high = wide.log_volume_interval
    assert low - 4 * se <= truth <= high + 4 * se, (wide.log_volume, (low, high), truth)
    assert wide.config["start_cutoff"] == 1.0 and wide.cutoffs == [0.01]  # the start's own cutoff is not reported
    assert max(wide.curve_cutoffs) >= 1.0 * (1 - 1e-6)  # it passed through the wider neighborhood


def test_same_seed_same_number_and_batch_size_independent():
    lam, y0 = _problem(20, seed=7)
    cost = _separable_cost(lam, y0, 0.1)
    run = lambda **kw: sequential_volume(cost, y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=64, **kw)  # noqa: E731
    first, again, batched = run(seed=4), run(seed=4), run(seed=4, batch_size=37)
    other = run(seed=5)
    assert first.log_volumes == again.log_volumes == batched.log_volumes
    assert first.evaluations == batched.evaluations
    assert other.log_volumes != first.log_volumes


@pytest.mark.parametrize("kernel, pilot, stop",
                         [("hmc", 0, 3), ("pcn", 0, 3), ("hmc", 32, 2), ("hmc", 32, 30), ("hmc", 0, "landing")])
def test_checkpoint_resume_gives_the_uninterrupted_result(kernel, pilot, stop):
    """Stopped after ``stop`` steps (with a pilot: inside the pilot, and after it; or in the landing moves)."""
    lam, y0 = _problem(20, seed=8)
    cost = _separable_cost(lam, y0, 3.0 if pilot else 0.1)
    options = dict(cutoff=0.5, sigma=1.0, curvature=lam, n_particles=64, seed=9, kernel=kernel, pilot_particles=pilot)
    whole = sequential_volume(cost, y0, **options)
    sampler = SequentialSampler(cost, y0, **options)
    if stop == "landing":
        while not sampler.landing_left:
            sampler.advance()
        sampler.advance()
        assert 0 < sampler.landing_left < sampler.landing_moves
    else:
        for _ in range(stop):
            sampler.advance()
    state = sampler.state_dict()
    resumed = sequential_volume(cost, y0, state=state, **options)
    assert resumed.log_volumes == whole.log_volumes and resumed.evaluations == whole.evaluations
    with pytest.raises(ValueError, match="same options"):
        sequential_volume(cost, y0, state=state, **{**options, "seed": 10})
    with pytest.raises(ValueError, match="same options"):
        sequential_volume(cost, y0, state=state, **{**options, "start_cutoff": 5.0})
    older = {**state, "config": {k: v for k, v in state["config"].items() if k != "start_cutoff"}}
    assert sequential_volume(cost, y0, state=older, **options).log_volumes == whole.log_volumes  # saved before it
    with pytest.raises(ValueError, match="same options"):  # a state saved before landing moves made none
        sequential_volume(cost, y0, state={**state, "config": {k: v for k, v in state["config"].items()
                                                               if k != "landing_moves"}}, **options)


def test_evaluation_budget_is_respected():
    lam, y0 = _problem(20, seed=9)
    cost = _separable_cost(lam, y0, 0.5)
    calls = []
    counted = lambda x: (calls.append(x.shape[0]), cost(x))[1]  # noqa: E731
    for pilot in (0, 16):
        calls.clear()
        result = sequential_volume(counted, y0, cutoff=0.05, sigma=1.0, curvature=lam, n_particles=50,
                                   max_evaluations=2000, pilot_particles=pilot)
        checks = (1, 2) if pilot else (1,)  # the anchor's check, by each sampler that started
        assert result.evaluations <= 2000 and sum(calls) - result.evaluations in checks
        assert not result.complete and math.isnan(result.log_volume)


def test_result_round_trip(tmp_path):
    lam, y0 = _problem(10, seed=3)
    result = sequential_volume(_separable_cost(lam, y0, 0.0), y0, cutoff=0.5, sigma=1.0, curvature=lam, n_particles=32)
    loaded = SequentialResult.load(result.save(tmp_path / "r.json"))
    assert loaded == result
    assert "cutoff 0.5" in result.summary()


def test_interval_arithmetic():
    assert t_quantile(0.95, 3) == pytest.approx(3.1824)
    assert t_quantile(0.95, 30) == pytest.approx(2.0423, abs=2e-3)
    center, low, high = replicate_interval([-10.0, -10.0, -10.0])
    assert center == pytest.approx(-10.0) and low == pytest.approx(-10.0) and high == pytest.approx(-10.0)
    center, low, high = replicate_interval([0.0, math.log(3.0)])
    assert center == pytest.approx(math.log(2.0)) and low < center < high


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(cutoff=-1.0), ValueError), (dict(sigma=torch.ones(5)), TypeError), (dict(scope="nearby"), ValueError),
        (dict(curvature=None), ValueError), (dict(curvature=torch.ones(4)), ValueError),
        (dict(curvature=-torch.ones(5)), ValueError), (dict(curvature=(torch.ones(2), torch.ones(5, 2))), ValueError),
        (dict(n_particles=1), ValueError), (dict(n_replicates=0), ValueError), (dict(target_cess=1.5), ValueError),
        (dict(max_evaluations=0), ValueError), (dict(curvature="fisher"), TypeError),
        (dict(kernel="gibbs"), ValueError), (dict(leapfrog_steps=0), ValueError), (dict(pilot_particles=1), ValueError),
        (dict(pilot_particles=-4), ValueError), (dict(gradient="autograd"), TypeError),
        (dict(start_cutoff=0.1), ValueError), (dict(start_cutoff="wide"), TypeError),
        (dict(start_cutoff=5.0, scope="global"), ValueError), (dict(landing_moves=-1), ValueError),
        (dict(landing_moves=2.5), ValueError), (dict(scout="yes"), TypeError),
    ],
)
def test_bad_input_errors(change, error):
    y0 = torch.zeros(5, dtype=torch.float64)
    options = dict(cutoff=0.5, sigma=1.0, curvature=torch.ones(5, dtype=torch.float64), **{})
    options.update(change)
    with pytest.raises(error):
        SequentialSampler(lambda x: (x**2).sum(1), y0, **options)


def test_cost_not_zero_at_the_anchor_is_refused():
    y0 = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="0 at the anchor"):
        sequential_volume(lambda x: (x**2).sum(1) + 1.0, y0, cutoff=0.5, sigma=1.0, curvature=torch.ones(5))
