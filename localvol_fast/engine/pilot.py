"""The pilot directions and the per-cutoff track that starts every later search from what they found.

Directions run in a fixed order (direction 0, the rest of the pilot, then the others), and each
search starts from figures computed from finished directions alone, so a direction's search never
depends on the batch size, the number of processes or an interruption and resume.
"""

from __future__ import annotations

import math

import torch

from localvol_fast.core.search import CLIPPED, UNBOUNDED
from localvol_fast.engine.records import DirectionRecords

PILOT_DIRECTIONS = 8  # directions searched first; their typical radius starts every later search


def direction_batches(indices: list[int], batch_size: int, pilot: int = PILOT_DIRECTIONS):
    """The directions to run as int64 batches: direction 0, the rest of the pilot, then the others,
    each at most ``batch_size`` long.

    The split depends on ``batch_size`` but the search of every direction does not: direction 0 starts
    from the initial radius, the other pilot directions from its radius, and all later ones from the
    pilot's typical radius and slope.
    """
    groups = ([i for i in indices if i == 0], [i for i in indices if 0 < i < pilot], [i for i in indices if i >= pilot])
    for group in groups:
        for start in range(0, len(group), batch_size):
            yield torch.tensor(group[start : start + batch_size], dtype=torch.int64)


def typical_radius(radii: torch.Tensor, fallback: float) -> float:
    """Geometric median of the finite positive radii (radii concentrate in high dimension)."""
    good = radii[torch.isfinite(radii) & (radii > 0)]
    return float(torch.exp(torch.log(good).median())) if good.numel() else fallback


def typical_slope(slopes: torch.Tensor, fallback: float) -> float:
    """Median of the finite log-log slopes measured at the cutoff."""
    good = slopes[torch.isfinite(slopes)]
    return float(good.median()) if good.numel() else fallback


class CutoffTrack:
    """The directions finished for one cutoff, and the pilot's typical radius, slope and radius ratio.

    Direction 0 sets the start of the other pilot directions; once all pilot directions are done their
    typical values start every later search - computed from the finished directions themselves, so a
    resumed run (or any batch size, or any rank) starts exactly the same searches.
    """

    def __init__(self, eps: float, initial_radius: float, pilot: int, below: "CutoffTrack | None"):
        self.eps, self.initial_radius, self.pilot, self.below = eps, initial_radius, pilot, below
        self.start_radius, self.slope_hint, self.ratio = initial_radius, 2.0, math.nan
        self.mostly_unbounded = False
        self.reached: dict[int, bool] = {}  # whether the direction's ray met the cutoff inside the measure
        self.parts: list[DirectionRecords] = []
        self.radius: dict[int, float] = {}
        self.slope: dict[int, float] = {}
        self._stage = 0

    def done(self) -> "DirectionRecords":
        return DirectionRecords.concat(self.parts)

    def first_probes(self, indices: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """A direction's radius at the cutoff below times the pilot's typical ratio, else the typical radius;
        the measure's reach (inf, capped by the search) where most pilot directions never reached the cutoff."""
        n = indices.numel()
        if self.mostly_unbounded:
            return torch.full((n,), math.inf, dtype=torch.float64)
        if previous is None:
            return torch.full((n,), self.start_radius, dtype=torch.float64)
        if math.isnan(self.ratio):
            return torch.full((n,), math.nan, dtype=torch.float64)  # step from the earlier probes
        return torch.where(torch.isfinite(previous), previous * self.ratio, torch.full_like(previous, math.nan))

    def add(self, records: "DirectionRecords") -> None:
        self.parts.append(records)
        for i, r, s, status in zip(records.indices.tolist(), records.radii.tolist(), records.slopes.tolist(), records.status):
            self.radius[i], self.slope[i] = r, s
            self.reached[i] = status not in (UNBOUNDED, CLIPPED)
        if self._stage == 0 and 0 in self.radius:
            self.start_radius = typical_radius(torch.tensor([self.radius[0]]), self.initial_radius)
            self._stage = 1
        if self._stage == 1 and all(i in self.radius for i in range(self.pilot)):
            # Radii concentrate in high dimension, and so do the slope of log C at the cutoff and the ratio
            # of radii at two cutoffs: the pilot's typical values start every later search.
            radii = torch.tensor([self.radius[i] for i in range(self.pilot)], dtype=torch.float64)
            self.start_radius = typical_radius(radii, self.initial_radius)
            self.slope_hint = typical_slope(torch.tensor([self.slope[i] for i in range(self.pilot)]), 2.0)
            # A cutoff most rays never reach (a saturating cost): one probe at the reach settles those.
            self.mostly_unbounded = 2 * sum(self.reached[i] for i in range(self.pilot)) < self.pilot
            if self.below is not None:
                below = torch.tensor([self.below.radius[i] for i in range(self.pilot)], dtype=torch.float64)
                self.ratio = typical_radius(radii / below, math.nan)
            self._stage = 2
