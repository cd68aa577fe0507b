"""``sequential_volume``: a consistent estimate of log mu(S), S = {theta : C(theta) <= c}, by tempered SMC.

The tempered laws pi_(beta, alpha)(theta) ∝ prior(theta) exp(-beta C_alpha(theta)),
C_alpha = C_q + alpha (C - C_q) (C_q the quadratic surrogate of the curvature), have normalizers
Z = E_prior[exp(-beta C_alpha)], and at alpha = 1 every cutoff's probability is an exact identity:
    mu(S) = P_prior(C <= c) = Z_beta E_(pi_beta)[ exp(beta C) 1{C <= c} ],
best conditioned where E_(pi_beta)[C] = c (the saddlepoint tilt; on a quadratic this is the tilted
importance sampler of the ground truth). A population of N particles per replicate carries pi from
one law to the next (sequential Monte Carlo, Del Moral, Doucet & Jasra 2006): reweight by the ratio
of consecutive laws (log Z gains the log mean incremental weight), resample (systematic) when the
effective sample size falls below N/2, and move by pCN steps that leave the current law invariant.

scope="local": start from the exact Gaussian prior x exp(-beta0 C_q) (closed-form log Z), beta0 the
surrogate's saddlepoint for the largest cutoff; bridge alpha: 0 -> 1 at beta0 (exactly no variance on
a quadratic cost); then move beta until the population's mean cost passes every cutoff. The population
never leaves the anchor's surrogate neighbourhood, so other basins (an MLP's permuted copies) are not
counted. scope="global": start from the prior at beta = 0: P(C <= c) for theta ~ prior, which counts
every basin, e.g. the 64! hidden-unit permutations of a 64-unit layer if the sampler can find them
(it mostly cannot: MCMC rarely crosses between basins, so a global estimate is a lower bound on them).

R independent replicate populations run in the same batches; the estimate is the log-mean-exp of the
replicates' estimates and the 95% interval comes from their spread (t with R - 1 degrees of freedom).
It sees only the Monte Carlo error the replicates show: a bias all replicates share (a population that
has not mixed) is not in it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from localvol_fast.core.checks import (
    check_anchor, check_choice, check_cutoffs, check_flag, check_integer, check_number, check_open_fraction,
    check_seed,
)
from localvol_fast.engine.estimator import ANCHOR_COST_TOLERANCE
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.engine.sequential_moves import (
    coordinates_of, pcn_proposal, reference_log_ratio, weighted_moments,
)
from localvol_fast.engine.sequential_result import SequentialResult, replicate_interval

SCOPES = ("local", "global")
_STATE_FORMAT = "localvol_fast.SequentialSampler"
_MIN_STEP, _MAX_STEP = 1e-3, 1.0  # bounds of the pCN move size s = sqrt(1 - rho^2)
_VARIANCE_FLOOR = 1e-8  # reference variances stay above this fraction of the surrogate's
_MAX_STEPS = 100_000
_MIXING_WARNING = 0.25  # a move size below this in any step gets a note on the result


def sequential_volume(
    fn: Callable[[torch.Tensor], torch.Tensor],
    anchor: torch.Tensor,
    *,
    cutoff: float | Sequence[float],
    sigma: float,
    curvature=None,
    scope: str = "local",
    n_particles: int = 500,
    n_replicates: int = 4,
    moves_per_step: int = 3,
    target_cess: float = 0.7,
    target_acceptance: float = 0.3,
    seed: int = 0,
    max_evaluations: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    on_step: Callable | None = None,
    state: dict | None = None,
) -> SequentialResult:
    """Estimate log mu({theta : fn(theta) <= c}) (nats) for mu = N(0, sigma^2 I), at each cutoff c.

    fn: (B, D) parameter vectors -> (B,) costs, fn(anchor) = 0; called once per move on the whole
        population (R x N points, in chunks of ``batch_size`` rows).
    anchor: (D,) floating tensor theta0. cutoff: c > 0 or a list of them.
    sigma: the Gaussian prior's scale (a positive scalar; other measures are not supported yet).
    curvature: the surrogate C_q(theta) = (1/2)(theta - theta0)^T H (theta - theta0): a (D,) tensor
        (H diagonal), or an object with ``eigenvalues`` (k,) and ``vectors`` (D, k) orthonormal columns
        (H = Q diag(lam) Q^T; ``vectors`` None means a diagonal), or an (eigenvalues, vectors) pair.
        Required for scope="local"; for "global" it only shapes the moves (None: theta's own axes).
    n_particles: N per replicate; n_replicates: R (>= 2 for an interval); moves_per_step: pCN moves
        after each reweighting; target_cess: each step's conditional ESS, as a fraction of N;
        target_acceptance: the pCN move size adapts toward this acceptance rate.
    seed: the same seed gives the same result for any ``batch_size``.
    max_evaluations: stop (result.complete False) before a step would exceed this many evaluations.
    on_step(sampler): called after every step, e.g. to save ``sampler.state_dict()``; ``state``: such
        a dict, to resume exactly where it was taken (the other options must be the same).
    """
    sampler = SequentialSampler(
        fn, anchor, cutoff=cutoff, sigma=sigma, curvature=curvature, scope=scope, n_particles=n_particles,
        n_replicates=n_replicates, moves_per_step=moves_per_step, target_cess=target_cess,
        target_acceptance=target_acceptance, seed=seed, max_evaluations=max_evaluations, batch_size=batch_size,
    )
    if state is not None:
        sampler.load_state_dict(state)
    return sampler.run(progress=check_flag(progress, "progress"), on_step=on_step)


class SequentialSampler:
    """The state of one tempered-SMC run: ``advance()`` takes one step, ``state_dict()`` checkpoints it.

    Population: y (R, N, k) in the curvature's coordinates (r (R, N, D) beside it when k < D), the cost
    C and the surrogate C_q at each particle (R, N), normalized log weights (R, N), log Z (R,), the
    temperature beta and bridge alpha, per-replicate move sizes s (R,), and the random stream.
    """

    def __init__(self, fn, anchor, *, cutoff, sigma, curvature=None, scope="local", n_particles=500,
                 n_replicates=4, moves_per_step=3, target_cess=0.7, target_acceptance=0.3, seed=0,
                 max_evaluations=None, batch_size=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable (a (B, D) batch -> (B,) costs), got {type(fn).__name__}")
        self.fn, self.anchor = fn, check_anchor(anchor)
        self.cutoffs = check_cutoffs(cutoff)
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
            raise TypeError(f"sigma must be a positive number (the Gaussian prior's scale), got {type(sigma).__name__}; "
                            "per-parameter scales and other measures are not supported by the sequential method yet")
        self.sigma = check_number(sigma, "sigma", minimum=0.0, inclusive=False, what="the Gaussian prior's scale")
        self.scope = check_choice(scope, SCOPES, "scope")
        self.n_particles = check_integer(n_particles, "n_particles", minimum=2, what="particles per replicate")
        self.n_replicates = check_integer(n_replicates, "n_replicates", what="independent populations")
        self.moves_per_step = check_integer(moves_per_step, "moves_per_step", what="pCN moves after each reweighting")
        self.target_cess = check_open_fraction(target_cess, "target_cess", "conditional ESS per step, fraction of N")
        self.target_acceptance = check_open_fraction(target_acceptance, "target_acceptance")
        self.seed = check_seed(seed)
        self.max_evaluations = None if max_evaluations is None else check_integer(max_evaluations, "max_evaluations")
        self.batch_size = None if batch_size is None else check_integer(batch_size, "batch_size")
        self.coords = coordinates_of(curvature, self.anchor, self.sigma, self.scope)
        self.generator = torch.Generator(device=self.anchor.device).manual_seed(self.seed)
        self.evaluations, self.seconds, self.started = 0, 0.0, False
        self.steps, self.curve, self.landed = [], [], {}
        self.targets = sorted(set(self.cutoffs), reverse=True)

    # ----- the population ------------------------------------------------------------------------
    def costs(self, y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """(R, N) float64 costs of the particles, by batches of ``batch_size`` rows; NaN counts as +inf."""
        shape = y.shape[:2]
        flat_y = y.reshape(-1, y.shape[-1])
        flat_r = None if r is None else r.reshape(-1, r.shape[-1])
        step = self.batch_size or flat_y.shape[0]
        parts = []
        for lo in range(0, flat_y.shape[0], step):
            points = self.coords.points(flat_y[lo : lo + step], None if flat_r is None else flat_r[lo : lo + step])
            out = self.fn(points)
            out = torch.as_tensor(out).detach().reshape(-1).to(torch.float64)
            if out.numel() != points.shape[0]:
                raise ValueError(f"fn returned {out.numel()} values for a batch of {points.shape[0]}; it must return (B,)")
            parts.append(out.to(y.device))
        self.evaluations += flat_y.shape[0]
        out = torch.cat(parts).reshape(shape)
        return torch.nan_to_num(out, nan=math.inf)

    def start(self) -> None:
        """Draw the first population: the surrogate's tempered Gaussian (local) or the prior (global)."""
        anchor_cost = float(self.fn(self.anchor.reshape(1, -1).clone()).reshape(-1)[0])
        if not (math.isfinite(anchor_cost) and abs(anchor_cost) <= ANCHOR_COST_TOLERANCE * min(self.cutoffs)):
            raise ValueError(f"fn(anchor) = {anchor_cost!r}, but the cost must be 0 at the anchor, at least below "
                             f"{ANCHOR_COST_TOLERANCE:g} x the smallest cutoff {min(self.cutoffs)!r}")
        R, N = self.n_replicates, self.n_particles
        if self.scope == "local":
            self.beta, self.alpha = self.coords.saddlepoint_beta(max(self.cutoffs)), 0.0
        else:
            self.beta, self.alpha = 0.0, 1.0
        mean, var = self.coords.tempered_gaussian(self.beta)
        self.y = self.coords.sample_gaussian(mean, var, (R, N), self.generator)
        self.r = self.coords.sample_complement((R, N), self.generator)
        self.cost, self.cq = self.costs(self.y, self.r), self.coords.quadratic(self.y)
        self.log_z = torch.full((R,), self.coords.log_normalizer(self.beta) if self.scope == "local" else 0.0,
                                dtype=torch.float64, device=self.y.device)
        self.log_w = torch.full((R, N), -math.log(N), dtype=torch.float64, device=self.y.device)
        self.move_size = torch.full((R,), 0.5, dtype=torch.float64, device=self.y.device)
        self.started = True

    def tempered_cost(self, cost, cq) -> torch.Tensor:
        """C_alpha = C_q + alpha (C - C_q), with C = inf kept inf."""
        return cost if self.alpha == 1.0 else torch.where(torch.isinf(cost), cost, cq + self.alpha * (cost - cq))

    # ----- one step -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.started and self.alpha == 1.0 and not self.targets

    def advance(self) -> bool:
        """Reweight to the next law, record estimates, resample if needed, move. False when finished
        or when the next step would exceed ``max_evaluations`` (then nothing is changed)."""
        if not self.started:
            self.start()
        if self.done or len(self.steps) >= _MAX_STEPS:
            return False
        if self.max_evaluations is not None and (
            self.evaluations + self.moves_per_step * self.n_replicates * self.n_particles > self.max_evaluations
        ):
            return False
        if self.alpha < 1.0:
            phase, increment = "bridge", self._bridge_increment()
        else:
            phase, increment = "temper", self._temper_increment()
        ess_before = self._reweight(increment)
        if self.alpha == 1.0:
            self._record()
        resampled = bool((self._ess() < 0.5 * self.n_particles).any())
        if resampled:
            self._resample()
        acceptance = self._move()
        self.steps.append({
            "phase": phase, "beta": self.beta, "alpha": self.alpha, "cess": ess_before, "resampled": resampled,
            "acceptance": acceptance, "move_size": self.move_size.tolist(), "mean_cost": self._mean_cost(),
            "log_z": self.log_z.tolist(), "evaluations": self.evaluations,
        })
        return True

    def _cess(self, increment: torch.Tensor) -> float:
        """min over replicates of the conditional ESS fraction (sum w e^a)^2 / sum w e^(2a) of log
        increments a (R, N) under the current normalized weights."""
        a = self.log_w + torch.nan_to_num(increment, nan=-math.inf)
        cess = torch.exp(2 * torch.logsumexp(a, 1) - torch.logsumexp(self.log_w + 2 * increment, 1))
        return float(torch.nan_to_num(cess, nan=0.0).min())

    def _largest_step(self, increment_of, limit: float) -> float:
        """The largest t in (0, limit] with conditional ESS >= target_cess for increment_of(t), by
        bisection in log t (the CESS decreases in t), to 0.1%."""
        ok = lambda t: self._cess(increment_of(t)) >= self.target_cess  # noqa: E731
        if ok(limit):
            return limit
        low, high = limit * 1e-2, limit
        while not ok(low) and low > limit * 1e-60:
            low, high = low * 1e-2, low
        while high > low * 1.001:
            mid = math.sqrt(low * high)
            low, high = (mid, high) if ok(mid) else (low, mid)
        return low

    def _bridge_increment(self) -> torch.Tensor:
        difference = torch.where(torch.isinf(self.cost), self.cost, self.cost - self.cq)
        step = self._largest_step(lambda t: -self.beta * t * difference, 1.0 - self.alpha)
        self.alpha = 1.0 if step >= (1.0 - self.alpha) * (1 - 1e-12) else self.alpha + step
        return -self.beta * step * difference

    def _temper_increment(self) -> torch.Tensor:
        """-delta_beta C, delta_beta toward the next target cutoff (up while the mean cost is above it)."""
        target, mean = self.targets[0], self._mean_cost()
        if mean > target:
            limit = max(self.beta, 1.0 / max(float(self.cost[torch.isfinite(self.cost)].std()), 1e-300)) * 1e3
            step = self._largest_step(lambda t: -t * self.cost, limit)
            step = min(step, self._landing_step(target, step, +1.0))
            delta = step
        else:
            if self.beta == 0.0:  # the prior itself: every remaining target above the mean is reached
                return torch.zeros_like(self.cost)
            step = self._largest_step(lambda t: t * self.cost, self.beta)
            delta = -min(step, self._landing_step(target, step, -1.0))
        self.beta = max(self.beta + delta, 0.0)
        return -delta * self.cost

    def _landing_step(self, target: float, limit: float, sign: float) -> float:
        """The step t in [0, limit] at which the reweighted mean cost equals ``target``, or limit if it
        is not reached within limit (bisection; the mean decreases as beta grows)."""
        mean_after = lambda t: self._mean_cost(-sign * t * self.cost)  # noqa: E731
        if (mean_after(limit) - target) * sign > 0:
            return limit
        low, high = 0.0, limit
        for _ in range(80):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if (mean_after(mid) - target) * sign > 0 else (low, mid)
        return high

    def _mean_cost(self, increment: torch.Tensor | None = None) -> float:
        """The weighted mean of C over each replicate (after the increment, if given), averaged over replicates."""
        log_w = self.log_w if increment is None else self.log_w + increment
        w = torch.softmax(log_w, 1)
        finite = torch.where(w > 0, self.cost, torch.zeros_like(self.cost))
        return float((w * finite).sum(1).mean())

    def _reweight(self, increment: torch.Tensor) -> float:
        cess = self._cess(increment)
        a = self.log_w + increment
        step = torch.logsumexp(a, 1)
        self.log_z = self.log_z + step
        self.log_w = a - step.unsqueeze(1)
        return cess

    def _ess(self) -> torch.Tensor:
        return torch.exp(-torch.logsumexp(2 * self.log_w, 1))

    def _record(self) -> None:
        """The estimate at the mean cost (a curve point), and at every target the mean has reached."""
        mean = self._mean_cost()
        self.curve.append((mean, self.log_probability(mean).tolist()))
        while self.targets and (abs(self.targets[0] - mean) <= 1e-9 * self.targets[0]
                                or (self.beta == 0.0 and self.targets[0] >= mean)):
            target = self.targets.pop(0)
            self.landed[target] = (self.log_probability(target).tolist(), self.beta)

    def log_probability(self, cutoff: float) -> torch.Tensor:
        """(R,) log P(C <= cutoff) per replicate: log Z + log sum_j w_j exp(beta C_j) 1{C_j <= cutoff}."""
        inside = self.cost <= cutoff
        terms = torch.where(inside, self.log_w + self.beta * self.cost, torch.full_like(self.cost, -math.inf))
        return self.log_z + torch.logsumexp(terms, 1)

    def _resample(self) -> None:
        """Systematic resampling of each replicate to equal weights."""
        R, N = self.log_w.shape
        cumulative = torch.cumsum(torch.softmax(self.log_w, 1), 1)
        cumulative[:, -1] = 1.0
        u = (torch.rand(R, 1, generator=self.generator, dtype=torch.float64, device=self.log_w.device)
             + torch.arange(N, dtype=torch.float64, device=self.log_w.device)) / N
        picks = torch.searchsorted(cumulative, u).clamp_max(N - 1)

        def take(x):
            if x is None:
                return None
            index = picks if x.dim() == 2 else picks.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            return torch.gather(x, 1, index)

        self.y, self.r, self.cost, self.cq = take(self.y), take(self.r), take(self.cost), take(self.cq)
        self.log_w = torch.full_like(self.log_w, -math.log(N))

    def _move(self) -> float:
        """``moves_per_step`` pCN moves with the reference N(m, V) fitted to the weighted population;
        the move size adapts toward ``target_acceptance``. Returns the mean acceptance rate."""
        _, floor = self.coords.tempered_gaussian(self.beta)
        mean, var = weighted_moments(self.y, self.log_w, _VARIANCE_FLOOR * floor)
        rates = []
        for _ in range(self.moves_per_step):
            y_new, r_new = pcn_proposal(self.coords, self.y, self.r, mean, var, self.move_size, self.generator)
            cost_new, cq_new = self.costs(y_new, r_new), self.coords.quadratic(y_new)
            # log [pi(x') / ref(x')] - log [pi(x) / ref(x)]: the pCN proposal is reversible for ref
            log_ratio = (
                -self.beta * self.tempered_cost(cost_new, cq_new) + reference_log_ratio(y_new, mean, var, self.sigma)
                + self.beta * self.tempered_cost(self.cost, self.cq) - reference_log_ratio(self.y, mean, var, self.sigma)
            )
            u = torch.rand(log_ratio.shape, generator=self.generator, dtype=torch.float64, device=log_ratio.device)
            accept = torch.log(u) < torch.nan_to_num(log_ratio, nan=-math.inf)
            self.y = torch.where(accept.unsqueeze(-1), y_new, self.y)
            if self.r is not None:
                self.r = torch.where(accept.unsqueeze(-1), r_new, self.r)
            self.cost, self.cq = torch.where(accept, cost_new, self.cost), torch.where(accept, cq_new, self.cq)
            rate = accept.double().mean(1)
            self.move_size = (self.move_size * torch.exp(rate - self.target_acceptance)).clamp(_MIN_STEP, _MAX_STEP)
            rates.append(float(rate.mean()))
        return sum(rates) / len(rates)

    # ----- running, results, checkpoints ---------------------------------------------------------
    def run(self, progress: bool = False, on_step: Callable | None = None) -> SequentialResult:
        bar = ProgressBar(self.max_evaluations, label="evaluations", enabled=progress)  # None: no total
        began = time.perf_counter()
        last = self.evaluations
        while self.advance():
            if on_step is not None:
                on_step(self)
            bar.update(self.evaluations - last, beta=self.beta, alpha=self.alpha, cost=self._mean_cost())
            last = self.evaluations
        bar.close()
        self.seconds += time.perf_counter() - began
        return self.result()

    def result(self) -> SequentialResult:
        log_volumes, intervals, replicates, notes = [], [], [], []
        for c in self.cutoffs:
            if c in self.landed:
                values = self.landed[c][0]
                center, low, high = replicate_interval(values)
            else:
                values, center, low, high = [math.nan] * self.n_replicates, math.nan, math.nan, math.nan
            log_volumes.append(center)
            intervals.append((low, high))
            replicates.append(values)
        if self.n_replicates < 2:
            notes.append("one replicate: no interval (use n_replicates >= 2)")
        smallest = min((min(step["move_size"]) for step in self.steps), default=_MAX_STEP)
        if smallest < _MIXING_WARNING:
            notes.append(
                f"the pCN move size fell to {smallest:.3g} of the reference's scale: the population mixes slowly and "
                "can collapse, biasing the estimate beyond its interval (measured: +1 nat at D = 200 on a strong "
                "quartic); more particles help, more moves per step did not"
            )
        curve = sorted(self.curve)
        return SequentialResult(
            cutoffs=list(self.cutoffs), log_volumes=log_volumes, intervals=intervals, replicate_log_volumes=replicates,
            curve_cutoffs=[c for c, _ in curve], curve_log_volumes=[replicate_interval(v)[0] for _, v in curve],
            evaluations=self.evaluations, seconds=self.seconds, steps=list(self.steps), dim=self.coords.dim,
            measure={"name": "gaussian", "sigma": self.sigma},
            config={"scope": self.scope, "n_particles": self.n_particles, "n_replicates": self.n_replicates,
                    "moves_per_step": self.moves_per_step, "target_cess": self.target_cess,
                    "target_acceptance": self.target_acceptance, "seed": self.seed, "kernel": "pcn"},
            complete=self.done, notes=notes,
        )

    _TENSORS = ("y", "r", "cost", "cq", "log_w", "log_z", "move_size")

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (tensors are references: torch.save it)."""
        state = {"format": _STATE_FORMAT, "started": self.started, "evaluations": self.evaluations,
                 "seconds": self.seconds, "steps": list(self.steps), "curve": list(self.curve),
                 "landed": dict(self.landed), "targets": list(self.targets), "generator": self.generator.get_state(),
                 "config": self._config()}
        if self.started:
            state.update({name: getattr(self, name) for name in self._TENSORS}, beta=self.beta, alpha=self.alpha)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not a SequentialSampler.state_dict()")
        if state["config"] != self._config():
            raise ValueError(
                f"the saved run had options {state['config']}, this one {self._config()}; resume with the same options"
            )
        for name in ("started", "evaluations", "seconds", "steps", "curve", "landed", "targets"):
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
        if self.started:
            for name in self._TENSORS:
                setattr(self, name, state[name])
            self.beta, self.alpha = state["beta"], state["alpha"]

    def _config(self) -> dict:
        return {"cutoffs": list(self.cutoffs), "sigma": self.sigma, "scope": self.scope, "dim": self.coords.dim,
                "n_particles": self.n_particles, "n_replicates": self.n_replicates, "seed": self.seed,
                "moves_per_step": self.moves_per_step, "target_cess": self.target_cess,
                "target_acceptance": self.target_acceptance}
