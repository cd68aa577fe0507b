"""``sequential_volume``: a consistent estimate of log mu(S), S = {theta : C(theta) <= c}, by tempered SMC.

The laws pi_(beta, alpha)(theta) ∝ prior(theta) exp((1 - alpha) l(y) - alpha beta C(theta)) bridge a
Gaussian start g, l = log g - log prior (in the curvature's coordinates y), at alpha = 0 to the tempered
cost at alpha = 1; they have normalizers Z = E_prior[exp((1 - alpha) l - alpha beta C)], Z = 1 at
alpha = 0 because g is normalized, and at alpha = 1 every cutoff's probability is an exact identity:
    mu(S) = P_prior(C <= c) = Z_beta E_(pi_beta)[ exp(beta C) 1{C <= c} ],
best conditioned where E_(pi_beta)[C] = c (the saddlepoint tilt; on a quadratic this is the tilted
importance sampler of the ground truth). A population of N particles per replicate carries pi from
one law to the next (sequential Monte Carlo, Del Moral, Doucet & Jasra 2006): reweight by the ratio
of consecutive laws (log Z gains the log mean incremental weight), resample (systematic) when the
effective sample size falls below N/2, and move by MCMC steps that leave the current law invariant:
HMC with the other replicates' per-axis scales as its mass (``engine.sequential_hmc``; needs the
cost's gradient) or, for costs without one, pCN with a Gaussian reference fitted to the population.

scope="local": g is the exact Gaussian prior x exp(-beta0 C_q) / Z_q (C_q the quadratic surrogate of
the curvature, closed-form Z_q), beta0 the surrogate's saddlepoint for the largest cutoff (or for a
larger ``start_cutoff``, a wider start: a bent neighborhood needs one): then the bridge is
C_q + alpha (C - C_q), with no variance at all on a quadratic cost. With a pilot
(``pilot_particles``) a short run of its own first carries a small population the whole way, and g is the
Gaussian fitted to where it landed (per axis of y, at its beta): the main run's bridge is then short,
its cost spent on many particles instead of a long path (the pilot changes the path, never the
identity, so the estimate stays exact in expectation). Then beta moves until the population's mean
cost passes every cutoff. The population
never leaves the anchor's surrogate neighbourhood, so other basins (an MLP's permuted copies) are not
counted. scope="global": start from the prior at beta = 0: P(C <= c) for theta ~ prior, which counts
every basin, e.g. the 64! hidden-unit permutations of a 64-unit layer if the sampler can find them
(it mostly cannot: MCMC rarely crosses between basins, so a global estimate is a lower bound on them).

The last step, from the law at a cutoff's beta to the cutoff itself, is one importance step with weights
exp(beta C) 1{C <= c}: beta C spreads by about sqrt(k / 2) nats over k constrained directions (35 on the
digits quartics), so only a few per cent of the particles count, and this step's noise dominated the
replicates' spread. ``landing_moves`` more MCMC moves at that law, each followed by the cutoff's estimate
(each one unbiased in P, as any SMC estimate after moves that keep the law invariant), are averaged
(log-mean-exp per replicate) into the cutoff's value; a volume-vs-cutoff curve's points keep the single step.

The steps are chosen from the populations themselves (the conditional ESS of the next reweighting, the mean
cost at a landing), and a population that lags behind its law makes that choice a bias: measured on the
digits quartic 1e-3 (seed 4's start, two draws each of the main populations), a schedule chosen by the
replicates gave -0.29 and -0.20 nats, the same schedule fixed in advance +0.33 and -0.07. With
``scout=True`` one more population runs beside the replicates, moved the same way, and alone chooses the
steps; it is left out of the estimate, so the replicates' schedule no longer depends on their own
particles (it costs 1/R more evaluations).

R replicate populations run in the same batches; the estimate is the log-mean-exp of the replicates'
estimates and the 95% interval comes from their spread (t with R - 1 degrees of freedom). It sees only
the Monte Carlo error the replicates show: a bias all replicates share (a population that has not
mixed, a finite population's lag) is not in it. They are independent but for two things shared on
purpose: the pilot's start, and (HMC) each one's mass matrix, taken from the others' spread.
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
from localvol_fast.engine.sequential_hmc import hmc_move, value_and_gradient_by_autograd
from localvol_fast.engine.sequential_moves import (
    coordinates_of, log_normal_ratio, pcn_proposal, reference_log_ratio, weighted_moments,
)
from localvol_fast.engine.sequential_result import SequentialResult, replicate_interval

SCOPES = ("local", "global")
KERNELS = ("hmc", "pcn")
_STATE_FORMAT = "localvol_fast.SequentialSampler"
_MIN_STEP, _MAX_STEP = 1e-3, 1.0  # bounds of the move size (pCN: s = sqrt(1 - rho^2); HMC: leapfrog step)
_PILOT_FINAL_MOVES = 10  # extra moves of the pilot's landing population (a few percent of the pilot's cost)
_PILOT_MIN_BRIDGE = 10  # the pilot's fit replaces the surrogate's start from this many bridge steps
_HMC_ACCEPTANCE = 0.65  # the HMC step adapts toward this (Beskos et al. 2013: 0.651 is optimal as D grows)
_VARIANCE_FLOOR = 1e-8  # reference variances stay above this fraction of the surrogate's
_MAX_STEPS = 100_000
_MIXING_WARNING = 0.25  # a pCN move size below this in any step gets a note on the result


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
    moves_per_step: int = 6,
    target_cess: float = 0.7,
    target_acceptance: float | None = None,
    kernel: str = "hmc",
    gradient: Callable | None = None,
    leapfrog_steps: int = 10,
    pilot_particles: int = 0,
    start_cutoff: float | None = None,
    landing_moves: int = 30,
    scout: bool = False,
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
    n_particles: N per replicate; n_replicates: R (>= 2 for an interval); moves_per_step: MCMC moves
        after each reweighting (default 6; fewer let the population lag behind its law, which biases
        log V low by more than the interval shows: measured, about -1 nat with 2 moves and -0.2 with 6 on
        a D = 400 quartic and on the digits quartic 1e-2, ``bench/sequential_mixing.py``; 6 still left
        -0.4 nats on the digits quartic 1e-3, where 3 intervals of 10 missed: README, Accuracy);
        target_cess: each step's conditional ESS, as a fraction of N;
        target_acceptance: the move size adapts toward this acceptance rate (None: 0.65 for HMC, 0.3 for pCN).
    kernel: "hmc" (each move is a trajectory of ``leapfrog_steps`` evaluations of the cost and its
        gradient) or "pcn" (one evaluation of the cost per move; mixes poorly in high dimension on
        non-Gaussian costs). gradient: (B, D) -> ((B,) costs, (B, D) gradients) for "hmc"; None
        differentiates ``fn`` with autograd.
    pilot_particles: 0, or the particles of a one-replicate pilot run whose landing population gives
        the main run's Gaussian start (module docstring); its evaluations count in the total.
    start_cutoff: scope="local": the cutoff the surrogate's start is tempered for (None: the largest
        cutoff asked). A larger one starts the population wider and tempering then contracts it onto the
        cutoffs, so it covers the parts of a bent neighborhood the straight quadratic surrogate misses.
        Measured on the benchmark's 2-D banana (4 seeds, 6 moves): a start at the cutoff 0.45 nats low,
        no interval covering (50 moves per step: still 0.32 low); at 100 x the cutoff +0.03, 4 of 4
        covering, at the same cost. The population may then reach further from the anchor.
    landing_moves: MCMC moves at each requested cutoff's law once the population reaches it, each followed by
        the cutoff's estimate, averaged into its value (module docstring; 0: the single last step). They cost
        landing_moves x (leapfrog_steps or 1) x R x N evaluations per cutoff (30 x 10 x 4 x 200 = 240 k, 7% of
        a digits quartic's run). Measured on a D = 100 quadratic (40 seeds, N = 100), where the rest of the path
        is exact: the gaps' sd fell from 0.115 to 0.032 nats, both unbiased, 38 and 39 of 40 intervals covering.
    scout: one more population that alone chooses the steps and is left out of the estimate (module
        docstring); its evaluations count in the total.
    seed: the same seed gives the same result for any ``batch_size``.
    max_evaluations: stop (result.complete False) before a step would exceed this many evaluations.
    on_step(sampler): called after every step, e.g. to save ``sampler.state_dict()``; ``state``: such
        a dict, to resume exactly where it was taken (the other options must be the same).
    """
    sampler = SequentialSampler(
        fn, anchor, cutoff=cutoff, sigma=sigma, curvature=curvature, scope=scope, n_particles=n_particles,
        n_replicates=n_replicates, moves_per_step=moves_per_step, target_cess=target_cess,
        target_acceptance=target_acceptance, kernel=kernel, gradient=gradient, leapfrog_steps=leapfrog_steps,
        pilot_particles=pilot_particles, start_cutoff=start_cutoff, landing_moves=landing_moves, scout=scout, seed=seed,
        max_evaluations=max_evaluations, batch_size=batch_size,
    )
    if state is not None:
        sampler.load_state_dict(state)
    return sampler.run(progress=check_flag(progress, "progress"), on_step=on_step)


def check_start_cutoff(start_cutoff, cutoffs: Sequence[float], scope: str) -> float:
    """The cutoff the start is tempered for: the largest of ``cutoffs`` (checked), or a larger one given (local
    scope only); a TypeError or ValueError naming it otherwise."""
    largest = max(cutoffs)
    if start_cutoff is None:
        return largest
    value = check_number(start_cutoff, "start_cutoff", what="the cutoff the surrogate's start is tempered for")
    if scope != "local":
        raise ValueError(f"start_cutoff={start_cutoff!r} applies to scope='local' only (scope={scope!r} starts "
                         "from the prior); leave it None")
    if not value >= largest:
        raise ValueError(f"start_cutoff={start_cutoff!r} is below the largest cutoff {largest!r}; it must be at "
                         "least that (None: the largest cutoff)")
    return value


class SequentialSampler:
    """The state of one tempered-SMC run: ``advance()`` takes one step, ``state_dict()`` checkpoints it.

    Population: y (R, N, k) in the curvature's coordinates (r (R, N, D) beside it when k < D), the cost
    C and l = log g - log prior at each particle (R, N) (HMC: the cost's gradient beside them), normalized
    log weights (R, N), log Z (R,), the temperature beta and bridge alpha, per-replicate move sizes (R,),
    the start g (mean and variance per axis of y), and the random stream; the pilot's sampler while it runs.
    """

    def __init__(self, fn, anchor, *, cutoff, sigma, curvature=None, scope="local", n_particles=500,
                 n_replicates=4, moves_per_step=6, target_cess=0.7, target_acceptance=None, kernel="hmc",
                 gradient=None, leapfrog_steps=10, pilot_particles=0, start_cutoff=None, landing_moves=30, scout=False, seed=0,
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
        self.moves_per_step = check_integer(moves_per_step, "moves_per_step", what="MCMC moves after each reweighting")
        self.target_cess = check_open_fraction(target_cess, "target_cess", "conditional ESS per step, fraction of N")
        self.kernel = check_choice(kernel, KERNELS, "kernel")
        if target_acceptance is None:
            target_acceptance = _HMC_ACCEPTANCE if self.kernel == "hmc" else 0.3
        self.target_acceptance = check_open_fraction(target_acceptance, "target_acceptance")
        if gradient is not None and not callable(gradient):
            raise TypeError(f"gradient must be callable ((B, D) -> ((B,) costs, (B, D) gradients)), got "
                            f"{type(gradient).__name__}")
        self.gradient = gradient if gradient is not None else value_and_gradient_by_autograd(fn)
        self.leapfrog_steps = check_integer(leapfrog_steps, "leapfrog_steps", what="evaluations per HMC move")
        self.pilot_particles = check_integer(pilot_particles, "pilot_particles", minimum=0,
                                             what="particles of the pilot run (0: none)")
        if self.pilot_particles == 1:
            raise ValueError("pilot_particles must be 0 (no pilot) or at least 2, got 1")
        self.start_cutoff = check_start_cutoff(start_cutoff, self.cutoffs, self.scope)
        self.landing_moves = check_integer(landing_moves, "landing_moves", minimum=0,
                                           what="MCMC moves at each cutoff's law, each adding an estimate")
        self.scouts = int(check_flag(scout, "scout"))  # 0 or 1 population before the replicates
        self.populations = self.n_replicates + self.scouts
        self.seed = check_seed(seed)
        self.max_evaluations = None if max_evaluations is None else check_integer(max_evaluations, "max_evaluations")
        self.batch_size = None if batch_size is None else check_integer(batch_size, "batch_size")
        self.coords = coordinates_of(curvature, self.anchor, self.sigma, self.scope)
        self.generator = torch.Generator(device=self.anchor.device).manual_seed(self.seed)
        self.evaluations, self.seconds, self.started = 0, 0.0, False
        self.steps, self.curve, self.landed = [], [], {}
        self.landing_left, self.landing_estimates = 0, {}  # the landing moves still to make, estimates so far
        self.targets = sorted(set(self.cutoffs) | {self.start_cutoff}, reverse=True)
        self.pilot = None
        if self.pilot_particles:
            self.pilot = SequentialSampler(
                fn, anchor, cutoff=self.start_cutoff, sigma=sigma, curvature=curvature, scope=scope,
                n_particles=self.pilot_particles, n_replicates=1, moves_per_step=1, target_cess=target_cess,
                target_acceptance=self.target_acceptance, kernel=kernel, gradient=self.gradient,
                leapfrog_steps=leapfrog_steps, landing_moves=0,  # its landing is only fitted, never estimated
                scout=False,
                seed=(self.seed + 1_000_003) % 2**64, batch_size=batch_size,
            )

    # ----- the population ------------------------------------------------------------------------
    def costs(self, y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """(R, N) float64 costs of the particles, by batches of ``batch_size`` rows; NaN counts as +inf."""
        return self._evaluate(y, r, with_gradient=False)[0]

    def costs_and_gradients(self, y, r):
        """Costs (R, N) and the cost's gradient in y (R, N, k) and in the complement r (R, N, D, or None);
        a non-finite cost counts as +inf (its gradient as 0: HMC rejects such points anyway)."""
        cost, grad = self._evaluate(y, r, with_gradient=True)
        # a row's sum is finite unless one of its entries is not (or it overflows: then it is treated as bad too)
        bad = ~torch.isfinite(grad.sum(-1)) | torch.isinf(cost)
        if bool(bad.any()):
            grad = grad.masked_fill(bad.unsqueeze(-1), 0.0)
            cost = cost.masked_fill(bad, math.inf)
        grad_y = grad if self.coords.vectors is None else grad @ self.coords.vectors
        grad_r = self.coords.project_out(grad) if self.coords.has_complement else None
        return cost, grad_y, grad_r

    def _evaluate(self, y, r, with_gradient: bool):
        shape = y.shape[:2]
        flat_y = y.reshape(-1, y.shape[-1])
        flat_r = None if r is None else r.reshape(-1, r.shape[-1])
        step = self.batch_size or flat_y.shape[0]
        costs, grads = [], []
        for lo in range(0, flat_y.shape[0], step):
            points = self.coords.points(flat_y[lo : lo + step], None if flat_r is None else flat_r[lo : lo + step])
            out, grad = self.gradient(points) if with_gradient else (self.fn(points), None)
            out = torch.as_tensor(out).detach().reshape(-1).to(torch.float64)
            if out.numel() != points.shape[0]:
                raise ValueError(f"fn returned {out.numel()} values for a batch of {points.shape[0]}; it must return (B,)")
            costs.append(out.to(y.device))
            if with_gradient:
                grad = torch.as_tensor(grad).detach().to(device=y.device, dtype=torch.float64)
                if grad.shape != points.shape:
                    raise ValueError(f"gradient returned a {tuple(grad.shape)} gradient for a batch of shape "
                                     f"{tuple(points.shape)}; it must return ((B,) costs, (B, D) gradients)")
                grads.append(grad)
        self.evaluations += flat_y.shape[0]
        cost = torch.nan_to_num(torch.cat(costs).reshape(shape), nan=math.inf)
        return cost, (torch.cat(grads).reshape(*shape, -1) if with_gradient else None)

    def start(self) -> None:
        """Draw the first population: the surrogate's tempered Gaussian (local) or the prior (global)."""
        anchor_cost = float(self.fn(self.anchor.reshape(1, -1).clone()).reshape(-1)[0])
        if not (math.isfinite(anchor_cost) and abs(anchor_cost) <= ANCHOR_COST_TOLERANCE * min(self.cutoffs)):
            raise ValueError(f"fn(anchor) = {anchor_cost!r}, but the cost must be 0 at the anchor, at least below "
                             f"{ANCHOR_COST_TOLERANCE:g} x the smallest cutoff {min(self.cutoffs)!r}")
        R, N = self.populations, self.n_particles
        if self.scope == "global" and not self.uses_pilot_start:
            self.beta, self.alpha = 0.0, 1.0
            self.start_mean = torch.zeros_like(self.coords.anchor_y)
            self.start_var = torch.full_like(self.coords.anchor_y, self.sigma**2)
        else:
            self.beta, self.alpha = self._start_law()
        self.y = self.coords.sample_gaussian(self.start_mean, self.start_var, (R, N), self.generator)
        self.r = self.coords.sample_complement((R, N), self.generator)
        self.log_start = self.start_log_ratio(self.y)
        if self.kernel == "hmc":
            self.cost, self.grad_y, self.grad_r = self.costs_and_gradients(self.y, self.r)
        else:
            self.cost, self.grad_y, self.grad_r = self.costs(self.y, self.r), None, None
        self.log_z = torch.zeros(R, dtype=torch.float64, device=self.y.device)
        self.log_w = torch.full((R, N), -math.log(N), dtype=torch.float64, device=self.y.device)
        initial = 0.1 if self.kernel == "hmc" else 0.5
        self.move_size = torch.full((R,), initial, dtype=torch.float64, device=self.y.device)
        self.started = True

    def _start_law(self) -> tuple[float, float]:
        """(beta, alpha) of the first law, and the start g = N(start_mean, diag start_var) in y: the
        pilot's landing population (weighted per-axis moments, at its beta), or the surrogate's tempered
        Gaussian at its saddlepoint beta."""
        if self.uses_pilot_start:
            pilot = self.pilot
            (cutoff,) = pilot.cutoffs
            beta = pilot.landed[cutoff][1]
            _, floor = self.coords.tempered_gaussian(beta)
            mean, var = weighted_moments(pilot.y, pilot.log_w, _VARIANCE_FLOOR * floor)
            self.start_mean, self.start_var = mean[0], var[0]
            return beta, 0.0
        beta = self.coords.saddlepoint_beta(self.start_cutoff)
        self.start_mean, self.start_var = self.coords.tempered_gaussian(beta)
        return beta, 0.0

    @property
    def uses_pilot_start(self) -> bool:
        """Whether the pilot's fit is the start: only when the pilot's own bridge was long. On a short one
        (a nearly quadratic cost) the surrogate's Gaussian is exact or close to it, and a fitted start
        from a small population is worse: measured on a D = 12 quadratic, the fit's start was 0.1-0.2 nats
        low in four seeds out of four, the surrogate's covered the truth."""
        if self.pilot is None:
            return False
        bridge = sum(step["phase"] == "bridge" for step in self.pilot.steps)
        return bridge >= _PILOT_MIN_BRIDGE or self.scope == "global"

    def start_log_ratio(self, y: torch.Tensor) -> torch.Tensor:
        """l(y) = log g(y) - log prior(y) over the last axis of y (the complement cancels); 0 once the
        bridge is done (alpha = 1), where l no longer enters the law, to spare its passes over y."""
        if self.alpha == 1.0:
            return torch.zeros(y.shape[:-1], dtype=torch.float64, device=y.device)
        return log_normal_ratio(y, self.start_mean, self.start_var, self.sigma**2)

    def log_target(self, cost, log_start) -> torch.Tensor:
        """log [pi / prior] = (1 - alpha) l - alpha beta C, up to a constant; C = inf gives -inf."""
        cost_term = torch.where(torch.isinf(cost), torch.full_like(cost, -math.inf), -self.beta * cost)
        if self.alpha == 1.0:
            return cost_term
        return (1.0 - self.alpha) * log_start + self.alpha * cost_term

    # ----- one step -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.started and self.alpha == 1.0 and not self.targets and not self.landing_left

    def step_evaluations(self) -> int:
        """Evaluations one step's moves take (the reweighting reuses the costs the moves computed)."""
        per_move = self.leapfrog_steps if self.kernel == "hmc" else 1
        return self.moves_per_step * per_move * self.populations * self.n_particles

    def _over_budget(self, evaluations: int) -> bool:
        return self.max_evaluations is not None and self.evaluations + evaluations > self.max_evaluations

    def advance(self) -> bool:
        """Reweight to the next law, record estimates, resample if needed, move (the pilot's steps
        first, when there is one). False when finished or when the next step would exceed
        ``max_evaluations`` (then nothing is changed)."""
        if self.pilot is not None and not self.pilot.done:
            return self._advance_pilot()
        if not self.started:
            if self._over_budget(self.populations * self.n_particles + 1):
                return False
            self.start()
        if self.done or len(self.steps) >= _MAX_STEPS:
            return False
        if self.landing_left:
            return self._advance_landing()
        if self._over_budget(self.step_evaluations()):
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
        self._log_step(phase, ess_before, resampled, acceptance)
        return True

    def _advance_landing(self) -> bool:
        """Up to ``moves_per_step`` of the landing moves at the law a cutoff was reached at, each followed by
        that cutoff's estimate; the cutoff's value becomes the log-mean-exp of its estimates so far."""
        moves = min(self.moves_per_step, self.landing_left)
        if self._over_budget(self.step_evaluations() // self.moves_per_step * moves):
            return False

        def estimate():
            for cutoff, estimates in self.landing_estimates.items():
                estimates.append(self.replicate_estimates(cutoff))

        acceptance = self._move(moves, after_each=estimate)
        self.landing_left -= moves
        for cutoff, estimates in self.landing_estimates.items():
            values = torch.tensor(estimates, dtype=torch.float64)
            self.landed[cutoff] = ((torch.logsumexp(values, 0) - math.log(len(estimates))).tolist(),
                                   self.landed[cutoff][1])
        if not self.landing_left:
            self.landing_estimates = {}
        self._log_step("landing", 1.0, False, acceptance)
        return True

    def _log_step(self, phase: str, cess: float, resampled: bool, acceptance: float) -> None:
        self.steps.append({
            "phase": phase, "beta": self.beta, "alpha": self.alpha, "cess": cess, "resampled": resampled,
            "acceptance": acceptance, "move_size": self.move_size.tolist(), "mean_cost": self._mean_cost(),
            "log_z": self.log_z.tolist(), "evaluations": self.evaluations,
        })

    def _advance_pilot(self) -> bool:
        """One step of the pilot run; its evaluations count as this run's. Its steps are recorded with
        the phase "pilot bridge" / "pilot temper"."""
        pilot = self.pilot
        cost = pilot.step_evaluations() + (0 if pilot.started else pilot.n_particles + 1)
        if self._over_budget(cost):
            return False
        before = pilot.evaluations
        if not pilot.advance():
            return False  # the pilot hit its step limit: so would this run
        if pilot.done:  # decorrelate the landing population before its moments become the start
            for _ in range(math.ceil(_PILOT_FINAL_MOVES / pilot.moves_per_step)):
                if not self._over_budget(pilot.evaluations - before + pilot.step_evaluations()):
                    pilot._move()
        self.evaluations += pilot.evaluations - before
        self.steps.append({**pilot.steps[-1], "phase": "pilot " + pilot.steps[-1]["phase"],
                           "evaluations": self.evaluations})
        return True

    def _cess(self, increment: torch.Tensor) -> float:
        """min over the steering populations (the scout, or every replicate) of the conditional ESS fraction
        (sum w e^a)^2 / sum w e^(2a) of log increments a (populations, N) under the current normalized weights."""
        a = self.log_w + torch.nan_to_num(increment, nan=-math.inf)
        cess = torch.exp(2 * torch.logsumexp(a, 1) - torch.logsumexp(self.log_w + 2 * increment, 1))
        return float(self._steering(torch.nan_to_num(cess, nan=0.0)).min())

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
        """t (-beta C - l): the log ratio of the laws at alpha + t and alpha (C = inf gives -inf)."""
        difference = torch.where(torch.isinf(self.cost), self.cost, self.beta * self.cost + self.log_start)
        step = self._largest_step(lambda t: -t * difference, 1.0 - self.alpha)
        self.alpha = 1.0 if step >= (1.0 - self.alpha) * (1 - 1e-12) else self.alpha + step
        return -step * difference

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

    def _steering(self, per_population: torch.Tensor) -> torch.Tensor:
        """The populations that choose the steps: the scout alone, or every replicate."""
        return per_population[: self.scouts] if self.scouts else per_population

    def _mean_cost(self, increment: torch.Tensor | None = None) -> float:
        """The weighted mean of C over each steering population (after the increment, if given), averaged."""
        log_w = self.log_w if increment is None else self.log_w + increment
        w = torch.softmax(log_w, 1)
        finite = torch.where(w > 0, self.cost, torch.zeros_like(self.cost))
        return float(self._steering((w * finite).sum(1)).mean())

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
        self.curve.append((mean, self.replicate_estimates(mean)))
        while self.targets and (abs(self.targets[0] - mean) <= 1e-9 * self.targets[0]
                                or (self.beta == 0.0 and self.targets[0] >= mean)):
            target = self.targets.pop(0)
            self.landed[target] = (self.replicate_estimates(target), self.beta)
            if self.landing_moves and target in self.cutoffs:
                self.landing_left = self.landing_moves
                self.landing_estimates[target] = [self.landed[target][0]]

    def replicate_estimates(self, cutoff: float) -> list[float]:
        """The R replicates' log P(C <= cutoff) (the scout's left out)."""
        return self.log_probability(cutoff)[self.scouts:].tolist()

    def log_probability(self, cutoff: float) -> torch.Tensor:
        """log P(C <= cutoff) per population (the scout first, if any): log Z + log sum_j w_j exp(beta C_j) 1{C_j <= cutoff}."""
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

        for name in ("y", "r", "cost", "log_start", "grad_y", "grad_r"):
            setattr(self, name, take(getattr(self, name)))
        self.log_w = torch.full_like(self.log_w, -math.log(N))

    def _move(self, count: int | None = None, after_each: Callable | None = None) -> float:
        """``count`` (default ``moves_per_step``) MCMC moves that leave the current law invariant, their size
        adapting toward ``target_acceptance``; the per-axis scales come from the weighted population (at
        least a tiny fraction of the surrogate's, so a collapsed axis still moves); ``after_each()`` is
        called after every move. Returns the mean acceptance rate."""
        _, floor = self.coords.tempered_gaussian(self.beta)
        mean, var = weighted_moments(self.y, self.log_w, _VARIANCE_FLOOR * floor)
        move = self._hmc_move if self.kernel == "hmc" else self._pcn_move
        rates = []
        for _ in range(self.moves_per_step if count is None else count):
            accept = move(mean, var)
            rate = accept.double().mean(1)
            self.move_size = (self.move_size * torch.exp(rate - self.target_acceptance)).clamp(_MIN_STEP, _MAX_STEP)
            rates.append(float(rate.mean()))
            if after_each is not None:
                after_each()
        return sum(rates) / len(rates)

    def _take(self, accept, y, r, cost, log_start, grad_y=None, grad_r=None) -> None:
        """Accepted particles (accept (R, N)) take the proposed state."""
        pick = lambda new, old: None if old is None else torch.where(  # noqa: E731
            accept.view(*accept.shape, *([1] * (old.dim() - 2))), new, old)
        self.y, self.r, self.cost, self.log_start = pick(y, self.y), pick(r, self.r), pick(cost, self.cost), pick(
            log_start, self.log_start)
        self.grad_y, self.grad_r = pick(grad_y, self.grad_y), pick(grad_r, self.grad_r)

    def _pcn_move(self, mean, var) -> torch.Tensor:
        """pCN with the reference N(mean, var), Metropolis-Hastings corrected (the proposal is reversible
        for the reference, so the ratio is that of pi / reference)."""
        y_new, r_new = pcn_proposal(self.coords, self.y, self.r, mean, var, self.move_size, self.generator)
        cost_new, start_new = self.costs(y_new, r_new), self.start_log_ratio(y_new)
        log_ratio = (
            self.log_target(cost_new, start_new) + reference_log_ratio(y_new, mean, var, self.sigma)
            - self.log_target(self.cost, self.log_start) - reference_log_ratio(self.y, mean, var, self.sigma)
        )
        u = torch.rand(log_ratio.shape, generator=self.generator, dtype=torch.float64, device=log_ratio.device)
        accept = torch.log(u) < torch.nan_to_num(log_ratio, nan=-math.inf)
        self._take(accept, y_new, r_new, cost_new, start_new)
        return accept

    def _potential(self, y, r, cost, log_start, grad_y, grad_r):
        """U = -log pi (up to a constant) and its gradients in y and r, from the cost's gradients."""
        a, sigma2 = self.alpha, self.sigma**2
        u = 0.5 * torch.linalg.vecdot(y, y) / sigma2 - self.log_target(cost, log_start)
        # with d l / dy = -(y - m) / v + y / sigma^2: dU/dy = a y / sigma^2 + (1 - a)(y - m) / v + a beta dC/dy,
        # written as in-place passes over the (R, N, k) arrays (the sampler's own cost is memory traffic)
        gy = torch.mul(grad_y, a * self.beta).add_(y, alpha=a / sigma2)
        if a < 1.0:
            gy.addcmul_(y - self.start_mean, (1.0 - a) / self.start_var)
        gr = None
        if r is not None:
            u = u + 0.5 * (r * r).sum(-1) / sigma2
            gr = r / sigma2 + a * self.beta * grad_r
        return u, gy, gr

    def _hmc_move(self, mean, var) -> torch.Tensor:
        """One HMC trajectory per particle, the mass matrix the inverse of the per-axis variance of the
        other replicates' populations (with one replicate: its own). A mass taken from the particles it
        moves makes the kernel depend on the particle itself, and that bias accumulates over a long path:
        measured on a D = 400 separable quartic (120 steps, N = 200), +7.6 nats with the replicate's own
        variance, -1.2 and -0.9 with the others' (the usual small lag of a finite population)."""
        if self.populations > 1:
            var = (var.sum(0, keepdim=True) - var) / (self.populations - 1)
        def potential(y, r):
            cost, grad_y, grad_r = self.costs_and_gradients(y, r)
            log_start = self.start_log_ratio(y)
            u, gy, gr = self._potential(y, r, cost, log_start, grad_y, grad_r)
            return u, gy, gr, (cost, log_start, grad_y, grad_r)

        here = self._potential(self.y, self.r, self.cost, self.log_start, self.grad_y, self.grad_r)
        y_new, r_new, accept, (_, _, _, kept) = hmc_move(
            self.y, self.r, (*here, None), potential, inverse_mass=var, step=self.move_size,
            n_steps=self.leapfrog_steps, generator=self.generator,
            project=self.coords.project_out if self.r is not None else None, complement_variance=self.sigma**2,
        )
        self._take(accept, y_new, r_new, *kept)
        return accept

    # ----- running, results, checkpoints ---------------------------------------------------------
    def run(self, progress: bool = False, on_step: Callable | None = None) -> SequentialResult:
        bar = ProgressBar(self.max_evaluations, label="evaluations", enabled=progress)  # None: no total
        began = time.perf_counter()
        last = self.evaluations
        while self.advance():
            if on_step is not None:
                on_step(self)
            running = self if self.started else self.pilot
            bar.update(self.evaluations - last, beta=running.beta, alpha=running.alpha, cost=running._mean_cost())
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
        own_steps = [step for step in self.steps if not step["phase"].startswith("pilot")]
        smallest = min((min(step["move_size"]) for step in own_steps), default=_MAX_STEP)
        if self.kernel == "pcn" and smallest < _MIXING_WARNING:
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
            config={key: value for key, value in self._config().items() if key not in ("cutoffs", "sigma", "dim")},
            complete=self.done, notes=notes,
        )

    _TENSORS = ("y", "r", "cost", "log_start", "grad_y", "grad_r", "log_w", "log_z", "move_size", "start_mean",
                "start_var")

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (tensors are references: torch.save it)."""
        state = {"format": _STATE_FORMAT, "started": self.started, "evaluations": self.evaluations,
                 "seconds": self.seconds, "steps": list(self.steps), "curve": list(self.curve),
                 "landed": dict(self.landed), "targets": list(self.targets), "generator": self.generator.get_state(),
                 "landing_left": self.landing_left,
                 "landing_estimates": {c: [list(e) for e in v] for c, v in self.landing_estimates.items()},
                 "config": self._config(), "pilot": None if self.pilot is None else self.pilot.state_dict()}
        if self.started:
            state.update({name: getattr(self, name) for name in self._TENSORS}, beta=self.beta, alpha=self.alpha)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not a SequentialSampler.state_dict()")
        saved = dict(state["config"])
        saved.setdefault("start_cutoff", max(saved.get("cutoffs", [0.0])))  # saved before start_cutoff existed
        saved.setdefault("landing_moves", 0)  # ... before landing_moves existed
        saved.setdefault("scout", False)
        if saved != self._config():
            raise ValueError(
                f"the saved run had options {saved}, this one {self._config()}; resume with the same options"
            )
        for name in ("started", "evaluations", "seconds", "steps", "curve", "landed", "targets"):
            setattr(self, name, state[name])
        self.landing_left = state.get("landing_left", 0)
        self.landing_estimates = {c: [list(e) for e in v] for c, v in state.get("landing_estimates", {}).items()}
        self.generator.set_state(state["generator"])
        if self.pilot is not None:
            self.pilot.load_state_dict(state["pilot"])
        if self.started:
            for name in self._TENSORS:
                setattr(self, name, state[name])
            self.beta, self.alpha = state["beta"], state["alpha"]

    def _config(self) -> dict:
        return {"cutoffs": list(self.cutoffs), "sigma": self.sigma, "scope": self.scope, "dim": self.coords.dim,
                "n_particles": self.n_particles, "n_replicates": self.n_replicates, "seed": self.seed,
                "moves_per_step": self.moves_per_step, "target_cess": self.target_cess,
                "target_acceptance": self.target_acceptance, "kernel": self.kernel,
                "leapfrog_steps": self.leapfrog_steps if self.kernel == "hmc" else None,
                "pilot_particles": self.pilot_particles, "start_cutoff": self.start_cutoff,
                "landing_moves": self.landing_moves, "scout": bool(self.scouts)}
