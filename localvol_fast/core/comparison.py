"""Paired differences of two log volumes measured on common random numbers.

Two anchors (checkpoints, a clean and a poisoned network) measured with the same seed see the same
random numbers: the ray method the same base Gaussian directions u_i (a seeded function of (seed, i)),
the sequential method the same replicate streams. Their log volumes then err together, and the
difference  log V_a - log V_b  is known better than either alone. Its interval resamples the PAIRS:
a percentile bootstrap over direction indices (rays), or a t interval of the replicate-wise differences
(sequential). Both are in nats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from localvol_fast.core.checks import check_integer, check_open_fraction, check_seed
from localvol_fast.core.result import VolumeResult, log_mean_exp
from localvol_fast.core.statistics import t_quantile

@dataclass(frozen=True)
class VolumeDifference:
    """log V_a - log V_b (nats) with a paired interval; ``log10`` divides by ln 10."""

    difference: float
    interval: tuple[float, float]
    log_volume_a: float
    log_volume_b: float
    n_pairs: int
    method: str
    level: float = 0.95

    @property
    def log10_difference(self) -> float:
        return self.difference / math.log(10.0)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of 0 (the two volumes differ at this level)."""
        low, high = self.interval
        return low > 0 or high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "interval": list(self.interval)}

    def __str__(self) -> str:
        low, high = self.interval
        return (
            f"log V_a - log V_b = {self.difference:.6g} nats, {self.level:.0%} interval [{low:.6g}, {high:.6g}] "
            f"({self.method}, {self.n_pairs} pairs; log V_a {self.log_volume_a:.6g}, log V_b {self.log_volume_b:.6g})"
        )


def paired_ray_difference(
    a: VolumeResult, b: VolumeResult, *, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> VolumeDifference:
    """The difference of two ray estimates taken along the same directions, with a paired bootstrap interval.

    a, b: results of the same seed, direction count, cutoff and measure (their ``indices`` must match:
    direction i of one is direction i of the other). Each resample draws n direction indices with
    replacement and recomputes log-mean-exp(a) - log-mean-exp(b) on those same indices.
    """
    for name, r in (("a", a), ("b", b)):
        if not isinstance(r, VolumeResult):
            raise TypeError(f"{name} must be a VolumeResult, got {type(r).__name__}")
    level = check_open_fraction(level, "level")
    n_resamples = check_integer(n_resamples, "n_resamples", minimum=10)
    seed = check_seed(seed)
    if a.n_samples == 0 or not torch.equal(a.indices, b.indices):
        raise ValueError(
            "a and b were not measured on the same directions (their direction indices differ, or are empty): "
            "run both with the same seed and n_samples to pair them"
        )
    if a.cutoff != b.cutoff or a.dim != b.dim or a.measure.get("name") != b.measure.get("name"):
        raise ValueError(
            f"a and b measure different things (cutoff {a.cutoff:g} vs {b.cutoff:g}, D {a.dim} vs {b.dim}, measure "
            f"{a.measure.get('name')} vs {b.measure.get('name')}); compare results of one cutoff, D and measure"
        )
    ea, eb = a.estimates.double(), b.estimates.double()
    n = ea.numel()
    picks = torch.randint(0, n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))
    boots = (torch.logsumexp(ea[picks], 1) - torch.logsumexp(eb[picks], 1))
    boots = boots[~torch.isnan(boots)]
    if boots.numel() == 0:
        interval = (math.nan, math.nan)
    else:
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        low, high = torch.quantile(boots, q)
        interval = (float(low), float(high))
    la, lb = log_mean_exp(ea), log_mean_exp(eb)
    return VolumeDifference(la - lb, interval, la, lb, n, "rays (paired bootstrap over directions)", level)


def paired_replicate_difference(
    replicates_a, replicates_b, *, log_volume_a: float, log_volume_b: float, method: str, level: float = 0.95
) -> VolumeDifference:
    """The difference of two replicated estimates (replicate k of a and of b share random numbers), with a t
    interval of the R replicate-wise differences: difference +- t_(R-1) sd / sqrt(R) (95% only)."""
    da = torch.as_tensor(replicates_a, dtype=torch.float64).reshape(-1)
    db = torch.as_tensor(replicates_b, dtype=torch.float64).reshape(-1)
    if da.numel() != db.numel() or da.numel() < 2:
        raise ValueError(
            f"a paired interval needs the same number (>= 2) of replicates on each side, got {da.numel()} and "
            f"{db.numel()}: run both with the same seed and n_replicates >= 2"
        )
    if level != 0.95:
        raise ValueError(f"the replicate interval is given at level 0.95 only, got {level!r}")
    diffs = da - db
    r = diffs.numel()
    half = t_quantile(0.95, r - 1) * float(diffs.std()) / math.sqrt(r)
    centre = log_volume_a - log_volume_b
    return VolumeDifference(centre, (centre - half, centre + half), log_volume_a, log_volume_b, r, method, level)
