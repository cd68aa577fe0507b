"""``preconditioner_eps="auto"``: choose the additive eps of a diagonal preconditioner on pilot directions.

A diagonal preconditioner p_i = 1 / (s_i^exponent + eps) (Adam moments, a Fisher diagonal, HesScale)
depends strongly on eps: where s_i is ~0 (the weights of always-blank pixels) a tiny eps gives those
coordinates p_i = 1/eps and they take nearly all of |P u|^2 (MATH.md, "The paper's digits setup"). So each
eps of a grid (the paper's sweep by default) is run on a small pilot set of directions and the best is kept.

Why the pilot cannot bias the estimate: the pilot uses the seed ``pilot_seed(seed)``, never the run's own
seed, so its directions are other Philox streams than directions 0..n-1 of the estimate (a seed is the
Philox key; distinct keys give unrelated streams). The estimate then runs with the chosen eps and the
user's seed: it is exactly the run that ``preconditioner_eps=<chosen>`` gives.

Why all eps see the same pilot directions: common random numbers. The difference between two eps is then
the effect of eps on the same u, not direction-to-direction noise, which is hundreds of nats on the
digits MLP and would swamp it.

Why the median is the criterion (not the pilot's log-mean-exp): the log-mean-exp of 64 directions is
their largest one plus at most log 64 (ESS is ~1), i.e. a single draw of a heavy right tail, so it ranks
eps by luck. The median measures where the bulk of the directions lands; it moves by the -D log|P u|
correction that ruins bad eps, and is stable across pilot seeds (measured in the report of issue 15).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from localvol_fast.core.result import log_mean_exp

# The paper's sweep of the additive eps (its digits experiment), largest first.
DEFAULT_EPS_GRID = (1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
DEFAULT_PILOT_DIRECTIONS = 64
# XOR with the 64-bit golden-ratio constant: a fixed bijection of [0, 2^64) with no fixed point, so the
# pilot's seed is never the run's seed, and each run seed has its own pilot seed.
PILOT_SEED_MASK = 0x9E3779B97F4A7C15
CRITERIA = ("median", "trimmed", "log-mean-exp")
TRIM_FRACTION = 0.1  # "trimmed": the log-mean-exp without the largest 10% of the pilot's directions


def pilot_seed(seed: int) -> int:
    """The seed of the pilot directions of a run with ``seed`` (never equal to it)."""
    return int(seed) ^ PILOT_SEED_MASK


def pilot_score(estimates: torch.Tensor, criterion: str) -> float:
    """The figure an eps is ranked by (larger is better); NaN estimates (failed directions) count as -inf."""
    values = torch.nan_to_num(estimates.double(), nan=-math.inf)
    if values.numel() == 0:
        return -math.inf
    if criterion == "median":
        return float(values.median())
    if criterion == "trimmed":
        kept = torch.sort(values).values[: max(1, math.floor(values.numel() * (1 - TRIM_FRACTION) + 1e-9))]
        return log_mean_exp(kept)
    if criterion == "log-mean-exp":
        return log_mean_exp(values)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def pilot_figures(eps: float, result, seconds: float, criterion: str) -> dict:
    """What the pilot measured for one eps (``result``: a ``VolumeResult``)."""
    finite = result.estimates[torch.isfinite(result.estimates)]
    return {
        "eps": eps,
        "log_volume": result.log_volume,
        "median": pilot_score(result.estimates, "median"),
        "max": float(finite.max()) if finite.numel() else math.nan,
        "effective_sample_size": result.effective_sample_size,
        "evaluations": int(result.n_evals.sum()),
        "seconds": seconds,
        "score": pilot_score(result.estimates, criterion),
        "statuses": result.status_counts(),
    }


def choose_preconditioner_eps(
    family: Callable[[float], torch.Tensor],
    run_pilot: Callable[[torch.Tensor, int, int], object],
    *,
    seed: int,
    grid: Sequence[float] = DEFAULT_EPS_GRID,
    pilot_directions: int = DEFAULT_PILOT_DIRECTIONS,
    criterion: str = "median",
) -> tuple[float, dict]:
    """The eps of ``grid`` whose pilot scores best, and the pilot's figures.

    family(eps): the (D,) diagonal preconditioner for that eps. run_pilot(preconditioner, n, seed): a
    ``VolumeResult`` of n directions of that seed (the same cost and options as the estimate).
    Every eps runs on the same ``pilot_directions`` directions of ``pilot_seed(seed)``.
    Returns (chosen eps, {"grid", "pilot_directions", "pilot_seed", "criterion", "per_eps", "chosen"}).
    """
    grid = [float(e) for e in grid]
    if not grid or not all(math.isfinite(e) and e >= 0 for e in grid):
        raise ValueError(f"the eps grid must be a non-empty list of finite numbers >= 0, got {grid!r}")
    if isinstance(pilot_directions, bool) or not isinstance(pilot_directions, int) or pilot_directions < 1:
        raise ValueError(f"pilot_directions must be a positive int, got {pilot_directions!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    seed_for_pilot = pilot_seed(seed)
    per_eps = []
    for eps in grid:
        started = time.perf_counter()
        result = run_pilot(family(eps), pilot_directions, seed_for_pilot)
        per_eps.append(pilot_figures(eps, result, time.perf_counter() - started, criterion))
    # Ties (equal scores) go to the first grid value, so the choice is a function of the figures alone.
    best = max(range(len(grid)), key=lambda k: (per_eps[k]["score"], -k))
    choice = {
        "grid": grid, "pilot_directions": pilot_directions, "pilot_seed": seed_for_pilot,
        "criterion": criterion, "per_eps": per_eps, "chosen": grid[best],
    }
    return grid[best], choice
