"""How far each volume estimator lands from a known truth: one table, problem x method.

    python bench/accuracy.py [--quick | --long] [--problems a,b] [--methods a,b] [--seeds N] [--first-seed K] [--out DIR]
                             [--moves-per-step M] [--update]

Problems (``bench/accuracy_problems.py``): the digits MLP's exact output Fisher as a quadratic cost, with
and without separable quartic terms (in the network's coordinates, cost evaluated through its eigenbasis,
and the same problems rotated into the eigenbasis), diagonal power-law spectra at D = 1e4 and 1e6, and
low-dimensional non-quadratic costs with a Monte Carlo truth. Every method sees the cost only through
batched evaluations (counted) and gets the same curvature at the anchor: eigenvalues lambda and, where
the problem has them, eigenvectors Q; diag H = sum_j Q_ij^2 lambda_j is derived from them.

Methods (rays: ``estimate_volume(..., measure="gaussian", sigma=...)``; D log|w| corrections as MATH.md):
- ``rays-isotropic``: no preconditioner.
- ``rays-diagonal-sqrt``: p_i = 1 / ((diag H)_i^0.5 + eps'), the paper's Adam-like / Fisher-like diagonal;
  eps' chosen on pilot directions (``nn.auto_eps.choose_preconditioner_eps``: the paper's grid
  1e1 .. 1e-5, 64 pilot directions of the pilot seed of seed 0, median criterion), once per problem; the
  pilot's evaluations and seconds are added to every seed's.
- ``rays-diagonal-prior``: p_i = ((diag H)_i / (2 eps) + 1 / sigma^2)^(-1/2) (prior-aware diagonal).
- ``rays-eigenbasis-sqrt``: ``Eigenbasis(Q, 1 / (lambda^0.5 + eps'))``, eps' chosen as above (the
  paper's full-Hessian preconditioner). Only where the problem has Q (else it is rays-diagonal-sqrt).
- ``rays-eigenbasis-prior``: ``Eigenbasis(Q, (lambda / (2 eps) + 1 / sigma^2)^(-1/2))``, the prior-aware
  scales MATH.md mentions. Only where the problem has Q (else it is rays-diagonal-prior).
- ``sequential``: ``engine.sequential.sequential_volume(scope="local", curvature=(lambda, Q))``, tempered
  SMC with R independent replicate populations; its interval is theirs (t, R - 1 dof).
- ``sequential-wide``: the same with ``start_cutoff`` = 100 x the cutoff: a wider start, tempered down to
  the cutoff (what a bent neighborhood such as the banana needs; more steps elsewhere).
Rays' interval: the percentile bootstrap over directions (``VolumeResult.log_volume_interval``, 95%).

Each (problem, method) runs for seeds K..K+N-1 (seed = the rays' direction seed, the sequential's seed;
K = --first-seed, default 0: long runs can be split over processes, one seed each).
gap = estimate - truth (nats; negative = too low); "covers": the 95% interval contains the truth.
A method whose projected cost (memory or seconds, from a timed batch of the problem's cost) is beyond
this machine is listed as skipped with the reason. Writes ``accuracy.md`` and ``accuracy.json`` to --out
(default bench/results), with the torch version, the machine and the command; with --update, this run's
seeds are merged into the table already there (the rest of it kept), and the table lists each update.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_problems as problems_module  # noqa: E402
from accuracy_problems import Problem  # noqa: E402
from provenance import short_commit  # noqa: E402

from localvol_fast import __version__  # noqa: E402
from localvol_fast.core.preconditioners import Eigenbasis  # noqa: E402
from localvol_fast.engine.estimator import estimate_volume  # noqa: E402
from localvol_fast.nn.auto_eps import DEFAULT_EPS_GRID, choose_preconditioner_eps  # noqa: E402

try:  # written at the same time as this benchmark
    from localvol_fast.engine.sequential import sequential_volume
except ImportError:  # pragma: no cover - only before engine/sequential.py exists
    sequential_volume = None

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "rays-isotropic", "rays-diagonal-sqrt", "rays-diagonal-prior", "rays-eigenbasis-sqrt", "rays-eigenbasis-prior",
    "sequential", "sequential-wide",
)
WIDE_START = 100.0  # sequential-wide: its start is the surrogate's for this many times the cutoff
SMALL_PROBLEMS = ("banana-2d", "coupled-quartic-5d", "powerlaw-1e4")
ALL_PROBLEMS = (
    "digits-fisher", "digits-quartic-0.001", "digits-quartic-0.01",
    "digits-fisher-eig", "digits-quartic-0.001-eig", "digits-quartic-0.01-eig",
    "powerlaw-1e4", "powerlaw-1e6", "banana-2d", "coupled-quartic-5d",
)
MEMORY_LIMIT_BYTES = 3 * 2**30  # the machine is shared: a method needing more is skipped, not swapped


@dataclass(frozen=True)
class Sizes:
    """How much each method may spend (per seed). Chosen so the default run takes ~20 min on 2 cores."""

    directions: int = 1000  # ray directions per run
    directions_large: int = 100  # ... at D = 1e6 (each direction is 8 MB of float64 per probe)
    pilot_directions: int = 64
    particles: int = 200  # sequential: particles per replicate
    replicates: int = 4
    particles_large: int = 25  # ... at D = 1e6 (the population is R x N x D float64)
    replicates_large: int = 2
    moves_per_step: int = 2  # as bench/results/accuracy.md was measured; estimate's default and --long: 6
    landing_moves: int = 30  # moves at the cutoff's law, each adding an estimate (engine.sequential's default)
    kernel: str = "hmc"  # the sequential's moves (engine.sequential KERNELS)
    leapfrog_steps: int = 10  # evaluations per HMC move
    pilot_particles: int = 100  # the sequential's pilot run (0: none)
    pilot_particles_large: int = 0  # ... at D = 1e6: none (its ~1,000 steps would spend the whole budget there)
    max_evaluations: int = 5_000_000
    tilted_samples: int = 50_000  # the quadratic truths' cross-check (D <= 1e4)
    mc_samples: int = 4_000_000  # the low-dimensional problems' Monte Carlo truth
    seconds_per_cell: float = 60.0  # the sequential's evaluation budget per seed, in projected seconds
    seconds_per_cell_large: float = 300.0  # ... at D = 1e6 (HMC: the start and 3 steps of 2 x 25 particles)


FULL = Sizes()
QUICK = Sizes(directions=100, directions_large=8, pilot_directions=16, particles=100, replicates=4,
              moves_per_step=2, landing_moves=5, leapfrog_steps=5, pilot_particles=32, pilot_particles_large=0, max_evaluations=200_000, tilted_samples=0,
              mc_samples=500_000, seconds_per_cell=10.0, seconds_per_cell_large=20.0)
# The sequential method on the digits quartics needs ~2-3.5 M evaluations, 10-20 min per seed on one core:
# --long gives it a budget of an hour per seed and 6 moves per step (the other sizes as FULL). With 2 moves
# its population lagged, about -1 nat on the quartic 1e-2, and the interval missed the truth in 2 seeds of 3;
# with 6 (1.7x the evaluations) the lag fell (1e-2: 10 of 10 intervals covered), but on 1e-3 3 of 10 still missed,
# about -0.4 nats (bench/results/long*/, bench/sequential_mixing.py).
LONG = Sizes(seconds_per_cell=3600.0, moves_per_step=6)


@dataclass
class Outcome:
    """One (problem, method, seed): log volume estimate and interval (nats), evaluations, seconds."""

    problem: str
    method: str
    seed: int
    status: str  # "ok", "skipped", "not available", "failed"
    estimate: float = math.nan
    interval: tuple[float, float] = (math.nan, math.nan)
    evaluations: int = 0
    seconds: float = 0.0
    reason: str = ""
    details: dict = field(default_factory=dict)


# ----- the methods -------------------------------------------------------------------------------


class Runner:
    """Runs the methods on one problem, sharing what is chosen once per problem (eps', row cost)."""

    def __init__(self, problem: Problem, sizes: Sizes, others: frozenset = frozenset()):
        self.problem, self.sizes, self.others = problem, sizes, others  # others: the run's other problems
        self.pilots: dict[str, tuple[float, dict, int, float]] = {}

    def run(self, method: str, seed: int) -> Outcome:
        skip = self.skip_reason(method)
        if skip:
            status = "not available" if skip.startswith("not available") else "skipped"
            return Outcome(self.problem.name, method, seed, status, reason=skip)
        cpu_started = time.process_time()
        try:
            with warnings.catch_warnings(record=True) as caught:  # kept in the outcome, not printed
                warnings.simplefilter("always")
                outcome = self.sequential(method, seed) if method.startswith("sequential") else self.rays(method, seed)
        except Exception as error:  # a method that breaks is a row of the table, not a crash of the run
            return Outcome(self.problem.name, method, seed, "failed", reason=f"{type(error).__name__}: {error}")
        outcome.details["cpu_seconds"] = time.process_time() - cpu_started  # this seed's own (pilot: the first)
        if caught:
            outcome.details["warnings"] = sorted({str(w.message) for w in caught})
        return outcome

    def skip_reason(self, method: str) -> str:
        p = self.problem
        if method.startswith("rays-eigenbasis") and p.vectors is None:
            same = method.replace("eigenbasis", "diagonal")
            return f"same as {same} here (the curvature's eigenbasis is the coordinate axes)"
        if method.startswith("sequential"):
            if sequential_volume is None:
                return "not available: localvol_fast/engine/sequential.py has no sequential_volume"
            if p.name + "-eig" in self.others:
                return (f"run on {p.name}-eig instead: the sampler works in y = Q^T theta, so it gives the same values "
                        "(up to rounding) here at ~2 extra D x D products per evaluation")
            replicates, particles = self.population()
            population = 6 * replicates * particles * p.dim * 8  # y, proposals, points, temporaries
            if population > MEMORY_LIMIT_BYTES:
                return (f"unaffordable here: its population ({replicates} x {particles} particles x "
                        f"D = {p.dim:,}) needs ~{population / 2**30:.0f} GiB of float64 working memory "
                        f"(limit {MEMORY_LIMIT_BYTES / 2**30:.0f} GiB on this shared machine)")
            per_move = self.sizes.leapfrog_steps if self.sizes.kernel == "hmc" else 1
            least = replicates * particles * (1 + self.sizes.moves_per_step * per_move)  # the start and one step
            if self.sequential_budget() < least:
                return (f"unaffordable in this configuration: its budget of {self.sequential_budget():,} evaluations "
                        f"(~{self.seconds_budget():.0f} s by the cost model) is below the {least:,} of its first step")
        return ""

    # ----- rays -------------------------------------------------------------------------------
    def rays(self, method: str, seed: int) -> Outcome:
        p = self.problem
        extra_evaluations, extra_seconds, details = 0, 0.0, {}
        if method in ("rays-diagonal-sqrt", "rays-eigenbasis-sqrt"):
            eps_prime, choice, extra_evaluations, extra_seconds = self.pilot(method)
            preconditioner = self.family(method)(eps_prime)
            details["eps_prime"] = eps_prime
            details["pilot_medians"] = {f"{f['eps']:g}": round(f["median"], 1) for f in choice["per_eps"]}
        else:
            preconditioner = self.fixed_preconditioner(method)
        counted = p.counted()
        started = time.perf_counter()
        result = estimate_volume(
            counted, p.anchor, cutoff=p.cutoff, n_samples=self.directions(), measure="gaussian", sigma=p.sigma,
            preconditioner=preconditioner, seed=seed,
        )
        seconds = time.perf_counter() - started
        low, high = result.log_volume_interval
        details.update(directions=result.n_samples, effective_sample_size=result.effective_sample_size,
                       statuses=result.status_counts(), max_estimate=float(result.estimates.max()),
                       median_estimate=float(result.estimates.median()))
        return Outcome(p.name, method, seed, "ok", result.log_volume, (low, high), counted.evaluations + extra_evaluations,
                       seconds + extra_seconds, details=details)

    def directions(self) -> int:
        return self.sizes.directions if self.problem.dim <= 100_000 else self.sizes.directions_large

    def family(self, method: str):
        """eps' -> the preconditioner p = 1 / (s^0.5 + eps') of the diagonal or the eigenvalues."""
        p = self.problem
        if method == "rays-diagonal-sqrt":
            diagonal = p.hessian_diagonal().clamp_min(0.0)
            return lambda eps: 1.0 / (diagonal.sqrt() + eps)
        return lambda eps: Eigenbasis(p.vectors, 1.0 / (p.eigenvalues.sqrt() + eps), check=False)  # eigh's Q

    def fixed_preconditioner(self, method: str):
        """None (isotropic) or the prior-aware scales (s / (2 eps) + 1 / sigma^2)^(-1/2)."""
        p = self.problem
        if method == "rays-isotropic":
            return None
        if method == "rays-diagonal-prior":
            return (p.hessian_diagonal().clamp_min(0.0) / (2 * p.cutoff) + p.sigma**-2).rsqrt()
        if method == "rays-eigenbasis-prior":
            return Eigenbasis(p.vectors, (p.eigenvalues / (2 * p.cutoff) + p.sigma**-2).rsqrt(), check=False)
        raise ValueError(f"unknown ray method {method!r}")

    def pilot(self, method: str) -> tuple[float, dict, int, float]:
        """eps' of the sqrt preconditioners, chosen once per problem on pilot directions (pilot seed of 0)."""
        if method not in self.pilots:
            p = self.problem
            counted = p.counted()

            def run_pilot(preconditioner, n, pilot_seed):
                return estimate_volume(counted, p.anchor, cutoff=p.cutoff, n_samples=n, measure="gaussian",
                                       sigma=p.sigma, preconditioner=preconditioner, seed=pilot_seed)

            started = time.perf_counter()
            eps_prime, choice = choose_preconditioner_eps(
                self.family(method), run_pilot, seed=0, grid=DEFAULT_EPS_GRID,
                pilot_directions=min(self.sizes.pilot_directions, self.directions()), criterion="median",
            )
            self.pilots[method] = (eps_prime, choice, counted.evaluations, time.perf_counter() - started)
        return self.pilots[method]

    # ----- sequential -------------------------------------------------------------------------
    def population(self) -> tuple[int, int]:
        """(replicates, particles per replicate) of the sequential method for this problem's D."""
        if self.problem.dim > 100_000:
            return self.sizes.replicates_large, self.sizes.particles_large
        return self.sizes.replicates, self.sizes.particles

    def pilot_particles(self) -> int:
        return self.sizes.pilot_particles_large if self.problem.dim > 100_000 else self.sizes.pilot_particles

    def seconds_budget(self) -> float:
        return self.sizes.seconds_per_cell_large if self.problem.dim > 100_000 else self.sizes.seconds_per_cell

    def sequential(self, method: str, seed: int) -> Outcome:
        p, s = self.problem, self.sizes
        start_cutoff = WIDE_START * p.cutoff if method == "sequential-wide" else None
        replicates, particles = self.population()
        budget = self.sequential_budget()
        curvature = p.eigenvalues if p.vectors is None else (p.eigenvalues, p.vectors)
        counted = p.counted()
        started = time.perf_counter()
        result = sequential_volume(
            counted, p.anchor, cutoff=p.cutoff, sigma=p.sigma, curvature=curvature, scope="local",
            n_particles=particles, n_replicates=replicates, moves_per_step=s.moves_per_step,
            landing_moves=s.landing_moves, seed=seed,
            kernel=s.kernel, leapfrog_steps=s.leapfrog_steps, pilot_particles=self.pilot_particles(),
            start_cutoff=start_cutoff, max_evaluations=budget,
        )
        seconds = time.perf_counter() - started
        last = result.steps[-1] if result.steps else {}
        details = {"particles": particles, "replicates": replicates, "moves_per_step": s.moves_per_step,
                   "landing_moves": s.landing_moves,
                   "kernel": s.kernel, "leapfrog_steps": s.leapfrog_steps, "pilot_particles": self.pilot_particles(),
                   "max_evaluations": budget, "start_cutoff": start_cutoff, "steps": len(result.steps),
                   "complete": result.complete,
                   "replicate_log_volumes": result.replicate_log_volumes[0],
                   "last_step": {k: last.get(k) for k in ("phase", "beta", "alpha", "mean_cost")}}
        low, high = result.log_volume_interval
        status, reason = "ok", ""
        if not result.complete or not math.isfinite(result.log_volume):
            where = ", ".join(f"{k} {v:.3g}" for k, v in details["last_step"].items() if isinstance(v, float))
            status = "incomplete"
            reason = (f"stopped at its budget of {budget:,} evaluations before the cutoff ({len(result.steps)} steps; "
                      f"last: {last.get('phase')}, {where})")
        return Outcome(p.name, method, seed, status, result.log_volume, (low, high), counted.evaluations,
                       seconds, reason=reason, details=details)

    def sequential_budget(self) -> int:
        """max_evaluations: the size's cap, lowered so that one seed's projected seconds stay within
        ``seconds_per_cell`` by a fixed cost model (not a live timing: the budget, hence the result,
        must not depend on the machine's load)."""
        p = self.problem
        per_evaluation = SEQUENTIAL_SECONDS_PER_ELEMENT * p.dim
        if p.vectors is not None:  # theta = Q y for the cost, the cost's own Q^T theta (and both back for HMC)
            per_evaluation += (4 if self.sizes.kernel == "hmc" else 2) * DENSE_SECONDS_PER_ELEMENT * p.dim * p.dim
        return max(1, min(self.sizes.max_evaluations, int(self.seconds_budget() / per_evaluation)))


# The cost model of ``sequential_budget``, measured on this machine (2 shared cores, 2026-12-01): the
# sampler's own work per evaluated particle and parameter, HMC with the cost's autograd gradient
# (digits-quartic-0.01-eig, D = 4,810: 3.0 M evaluations in 1,137 s, ~0.38 ms each), and a float64
# (B, D) @ (D, D) product per row and D^2.
SEQUENTIAL_SECONDS_PER_ELEMENT = 8e-8
DENSE_SECONDS_PER_ELEMENT = 4.5e-11


# ----- the table ---------------------------------------------------------------------------------


def summarize(problem: str, truth: float, method: str, outcomes: list[Outcome]) -> dict:
    """Mean estimate and gap (nats), sd of the gap, coverage count, mean evaluations and seconds."""
    ran = [o for o in outcomes if o.status in ("ok", "incomplete") and math.isfinite(o.estimate)]
    row = {"problem": problem, "method": method, "truth": truth, "seeds": len(outcomes), "ran": len(ran),
           "statuses": sorted({o.status for o in outcomes}), "reasons": _reasons(outcomes)}
    if not ran:
        return row
    gaps = [o.estimate - truth for o in ran]
    covers = [o.interval[0] <= truth <= o.interval[1] for o in ran]
    row.update(
        estimate=statistics.fmean(o.estimate for o in ran), gap=statistics.fmean(gaps),
        gap_sd=statistics.stdev(gaps) if len(gaps) > 1 else math.nan, covered=sum(covers),
        interval_seed0=list(ran[0].interval), evaluations=statistics.fmean(o.evaluations for o in ran),
        seconds=statistics.fmean(o.seconds for o in ran),
    )
    return row


def _sizes_text(meta: dict) -> str:
    z = meta["sizes"]
    return (f"{meta['seeds']} seeds; rays {z['directions']:,} directions ({z['directions_large']:,} at D = 1e6), eps' "
            f"pilot {z['pilot_directions']} directions x {len(DEFAULT_EPS_GRID)} eps'; sequential {z['replicates']} "
            f"replicates x {z['particles']} particles ({z['replicates_large']} x {z['particles_large']} at D = 1e6), "
            f"{z['moves_per_step']} {z.get('kernel', 'pcn')} moves per step"
            + (f" of {z['leapfrog_steps']} leapfrog steps" if z.get("kernel") == "hmc" else "")
            + f", {z.get('landing_moves', 0)} landing moves"
            + f", a pilot of {z.get('pilot_particles', 0)} particles ({z.get('pilot_particles_large', z.get('pilot_particles', 0))} at D = 1e6), budget {z['seconds_per_cell']:g} s ({z['seconds_per_cell_large']:g} s "
            f"at D = 1e6) per seed by a fixed cost model, at most {z['max_evaluations']:,} evaluations.")


def _reasons(outcomes: list[Outcome]) -> list[str]:
    """The distinct reasons; a budget stop is shown for seed 0 only (the others differ in digits)."""
    reasons = []
    for o in outcomes:
        if o.reason and o.reason not in reasons:
            if o.status == "incomplete" and any(r.startswith("seed") for r in reasons):
                continue
            reasons.append(f"seed {o.seed}: {o.reason}" if o.status == "incomplete" else o.reason)
    return reasons


def _number(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:,.{digits}f}"


def markdown(rows: list[dict], truths: dict, meta: dict) -> str:
    """The table (one row per problem x method) and the truths, as markdown."""
    lines = [
        "# Accuracy of the volume estimators against known truths",
        "",
        f"`{meta['command']}` - {meta['date']}, wall time {meta['wall_seconds']:.0f} s (CPU time "
        f"{meta.get('cpu_seconds', math.nan):.0f} s); torch {meta['torch']}, "
        f"{meta['cpu_count']} CPUs ({meta['torch_threads']} torch threads), {meta['platform']}, load average "
        f"{meta['load_average']}, localvol_fast {meta['localvol_fast']} (git {meta['git_commit']}).",
        "",
        "Nats. estimate: mean over seeds; gap = estimate - truth (mean ± sd over seeds; negative = too low);",
        "interval: 95% interval of the first seed; covers: seeds whose interval contains the truth; evals and s:",
        "mean per seed (cost evaluations, wall seconds; a pilot's share included). Definitions and recipes:",
        "`bench/accuracy.py`, `bench/accuracy_problems.py`. Sizes: " + _sizes_text(meta),
        "",
    ]
    for update in meta.get("updates", []):
        cells = ", ".join(f"{problem} x {method} seeds {', '.join(map(str, seeds))}" for problem, method, seeds
                          in update["cells"])
        lines.append(f"Updated by `{update['command']}` - {update['date']}, wall time {update['wall_seconds']:.0f} s, "
                     f"git {update['git_commit']}: {cells} (sizes: {_sizes_text(update)}).")
        lines.append("")
    lines += [
        "| problem | D | truth ± SE | method | estimate | gap ± sd | interval (first seed) | covers | evals | s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        t = truths[row["problem"]]
        truth = f"{_number(t['log_volume'], 2)} ± {t['standard_error']:.2g}"
        head = f"| {row['problem']} | {t['dim']:,} | {truth} | {row['method']} |"
        if "estimate" not in row:
            why = "; ".join(row["reasons"]) or ", ".join(row["statuses"])
            lines.append(f"{head} {', '.join(row['statuses'])}: {why} | | | | | |")
            continue
        low, high = row["interval_seed0"]
        note = "" if row["statuses"] == ["ok"] else f" ({', '.join(row['statuses'])})"
        lines.append(
            f"{head} {_number(row['estimate'])}{note} | {_number(row['gap'])} ± {_number(row['gap_sd'])} | "
            f"[{_number(low)}, {_number(high)}] | {row['covered']}/{row['ran']} | {row['evaluations']:,.0f} | "
            f"{row['seconds']:.1f} |"
        )
    lines += ["", "## Truths", "", "| problem | D | cutoff | sigma | truth | SE | how | cross-check | seconds |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, t in truths.items():
        check = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t["details"].items()
                          if k.endswith(("minus_lugannani_rice", "samples", "quadrature_error")))
        lines.append(f"| {name} | {t['dim']:,} | {t['cutoff']:g} | {t['sigma']:.4g} | {t['log_volume']:,.3f} | "
                     f"{t['standard_error']:.2g} | {t['method']} | {check} | {t['seconds']:.1f}"
                     f"{' (cached)' if 'cached' in t['details'] else ''} |")
    lines += ["", "## Problems", ""] + [f"- `{name}`: {t['recipe']}" for name, t in truths.items()]
    return "\n".join(lines) + "\n"


# ----- running -----------------------------------------------------------------------------------


def build_problems(names: list[str], sizes: Sizes, log) -> list[Problem]:
    """The named problems (the digits ones share one Fisher spectrum, built or read once)."""
    out = []
    spectrum = None
    for name in names:
        if name.startswith("digits-"):
            if spectrum is None:
                spectrum = problems_module.digits_fisher_spectrum(log=log)
            eig = name.endswith("-eig")
            family = {p.name: p for p in problems_module.digits_problems(spectrum, eig, sizes.tilted_samples)}
            out.append(family[name])
        elif name.startswith("powerlaw-"):
            dim = int(float(name.split("-")[1]))
            out.append(problems_module.powerlaw_problem(dim, sizes.tilted_samples if dim <= 10_000 else 0))
        elif name == "banana-2d":
            out.append(problems_module.banana_problem(sizes.mc_samples))
        elif name == "coupled-quartic-5d":
            out.append(problems_module.coupled_quartic_problem(sizes.mc_samples))
        else:
            raise ValueError(f"unknown problem {name!r}; the problems are {', '.join(ALL_PROBLEMS)}")
    return out


def truth_record(problem: Problem) -> dict:
    t = problem.truth()
    return {"dim": problem.dim, "cutoff": problem.cutoff, "sigma": problem.sigma, "log_volume": t.log_volume,
            "standard_error": t.standard_error, "method": t.method, "details": _plain(t.details),
            "seconds": t.seconds, "recipe": problem.recipe}


def run_benchmark(problem_names, method_names, seeds: int, sizes: Sizes, log=print,
                  first_seed: int = 0) -> tuple[list[dict], list[Outcome], dict]:
    """Every (problem, method, seed); returns the summary rows, every outcome, and the truths."""
    rows, outcomes, truths = [], [], {}
    for problem in build_problems(problem_names, sizes, log):
        others = frozenset(problem_names) - {problem.name}
        started = time.perf_counter()
        truths[problem.name] = truth_record(problem)
        log(f"[accuracy] {problem.name}: truth {problem.truth().log_volume:.3f} ± {problem.truth().standard_error:.2g} "
            f"({time.perf_counter() - started:.0f} s)")
        runner = Runner(problem, sizes, others)
        for method in method_names:
            these = [runner.run(method, seed) for seed in range(first_seed, first_seed + seeds)]
            outcomes += these
            rows.append(summarize(problem.name, problem.truth().log_volume, method, these))
            row = rows[-1]
            log(f"[accuracy]   {method:22s} " + (
                f"gap {row['gap']:10.1f} ± {row['gap_sd']:7.1f}  covers {row['covered']}/{row['ran']}  "
                f"evals {row['evaluations']:,.0f}  {row['seconds']:.1f} s" if "gap" in row
                else f"{', '.join(row['statuses'])}: {'; '.join(row['reasons'])}"))
    return rows, outcomes, truths


def machine(command: str, wall_seconds: float, sizes: Sizes, seeds: int) -> dict:
    return {
        "command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": wall_seconds, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "localvol_fast": __version__,
        "git_commit": short_commit(), "seeds": seeds, "sizes": sizes.__dict__,
    }


def _plain(value):
    """JSON-ready copy (tensors to lists, non-finite floats to strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write(out: Path, rows, outcomes, truths, meta) -> None:
    """Both files replaced whole (written beside, then renamed), so a reader never sees half of one."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": meta, "truths": truths, "rows": rows, "outcomes": [o.__dict__ for o in outcomes]}
    for name, text in (("accuracy.md", markdown(rows, truths, meta)),
                       ("accuracy.json", json.dumps(_plain(data), indent=1) + "\n")):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, out / name)


@contextlib.contextmanager
def exclusive(out: Path):
    """Holds an exclusive lock on the folder ``out``: seeds run as separate processes into one table
    (``--update``) take turns to read, merge and write it, so none loses another's outcomes."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def merge(previous: dict, rows, outcomes: list[Outcome], truths: dict, meta: dict):
    """``--update``: this run's (problem, method, seed) outcomes replace or join those of ``previous`` (an
    accuracy.json); every row is summarized again from the merged outcomes, and ``meta`` becomes an entry
    of the previous meta's ``updates`` (so the table says which run gave which cells)."""
    new = {(o.problem, o.method, o.seed) for o in outcomes}
    kept = [Outcome(**{**o, "estimate": float(o["estimate"]), "interval": tuple(map(float, o["interval"]))})
            for o in previous["outcomes"] if (o["problem"], o["method"], o["seed"]) not in new]  # "nan" back to nan
    order = {(p, m): i for i, (p, m) in enumerate((p, m) for p in ALL_PROBLEMS for m in METHODS)}
    merged = sorted(kept + list(outcomes), key=lambda o: (order.get((o.problem, o.method), len(order)), o.seed))
    truths = {**previous["truths"], **truths}
    cells = {}
    for o in merged:
        cells.setdefault((o.problem, o.method), []).append(o)
    rows = [summarize(p, float(truths[p]["log_volume"]), m, these) for (p, m), these in cells.items()]
    seeds = {}
    for o in outcomes:
        seeds.setdefault((o.problem, o.method), []).append(o.seed)
    update = {**meta, "cells": [[p, m, s] for (p, m), s in seeds.items()]}
    merged_meta = {**previous["machine"], "updates": [*previous["machine"].get("updates", []), update]}
    return rows, merged, truths, merged_meta


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~2 min): a smoke run, not the figures")
    parser.add_argument("--long", action="store_true",
                        help="the sequential's budget an hour per seed, 6 moves per step (quartics: ~20 min)")
    parser.add_argument("--problems", default=None, help=f"comma-separated (default all): {','.join(ALL_PROBLEMS)}")
    parser.add_argument("--methods", default=None, help=f"comma-separated (default all): {','.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds K..K+N-1 per (problem, method) (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="K, the first seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for accuracy.md / accuracy.json")
    parser.add_argument("--landing-moves", type=int, default=None,
                        help="the sequential's moves at the cutoff's law, each adding an estimate (default 30; 0: none)")
    parser.add_argument("--moves-per-step", type=int, default=None,
                        help="the sequential's MCMC moves per step (default: the size's, 2; 6 with --long)")
    parser.add_argument("--update", action="store_true",
                        help="merge into --out's accuracy.json: this run's seeds replace or join its cells, the rest stay")
    args = parser.parse_args(argv)
    args.problems = _names(args.problems, ALL_PROBLEMS, "problem")
    args.methods = _names(args.methods, METHODS, "method")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.landing_moves is not None and args.landing_moves < 0:
        parser.error(f"--landing-moves must be at least 0, got {args.landing_moves}")
    if args.moves_per_step is not None and args.moves_per_step < 1:
        parser.error(f"--moves-per-step must be at least 1, got {args.moves_per_step}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be at least 0, got {args.first_seed}")
    return args


def _names(text, known, what):
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what}(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else LONG if args.long else FULL
    if args.moves_per_step is not None:
        sizes = dataclasses.replace(sizes, moves_per_step=args.moves_per_step)
    if args.landing_moves is not None:
        sizes = dataclasses.replace(sizes, landing_moves=args.landing_moves)
    command = "python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows, outcomes, truths = run_benchmark(args.problems, args.methods, args.seeds, sizes, first_seed=args.first_seed)
    meta = machine(command.strip(), time.perf_counter() - started, sizes, args.seeds)
    meta["cpu_seconds"] = time.process_time() - cpu_started
    previous = args.out / "accuracy.json"
    with exclusive(args.out) if args.update else contextlib.nullcontext():
        if args.update and previous.exists():
            rows, outcomes, truths, meta = merge(json.loads(previous.read_text()), rows, outcomes, truths, meta)
        write(args.out, rows, outcomes, truths, meta)
    wall_seconds = time.perf_counter() - started
    print(f"[accuracy] wrote {args.out / 'accuracy.md'} and accuracy.json ({wall_seconds:.0f} s)")
    return {"rows": rows, "truths": truths, "machine": meta}


if __name__ == "__main__":
    main()
