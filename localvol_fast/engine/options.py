"""The options of a run, checked once where they enter (``estimate`` or ``estimate_volume``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from localvol_fast.core.checks import check_cutoffs, check_integer, check_open_fraction, check_seed, is_cutoff_list


@dataclass(frozen=True)
class RunOptions:
    """cutoffs: in the order given (``returns_list``: a list of results comes back); the rest as in
    ``estimate_volume``."""

    cutoffs: tuple[float, ...]
    returns_list: bool
    n_samples: int
    seed: int
    rtol: float
    batch_size: int | None
    max_evals: int
    initial_radius: float
    progress: bool
    output: object
    resume: bool
    distributed: bool

    @classmethod
    def checked(
        cls, *, cutoff, n_samples, seed=0, rtol=1e-2, batch_size=None, max_evals=64, initial_radius=1.0,
        progress=False, output=None, resume=False, distributed=False,
    ) -> "RunOptions":
        if not (isinstance(initial_radius, (int, float)) and math.isfinite(initial_radius) and initial_radius > 0):
            raise ValueError(f"initial_radius must be a finite positive number (the first probe), got {initial_radius!r}")
        return cls(
            cutoffs=tuple(check_cutoffs(cutoff)),
            returns_list=is_cutoff_list(cutoff),
            n_samples=check_integer(n_samples, "n_samples", what="number of directions"),
            seed=check_seed(seed),
            rtol=check_open_fraction(rtol, "rtol", "relative tolerance on |C - eps| / eps"),
            batch_size=None if batch_size is None else check_integer(batch_size, "batch_size", what="or None"),
            max_evals=check_integer(max_evals, "max_evals", what="cost evaluations per direction"),
            initial_radius=float(initial_radius),
            progress=bool(progress),
            output=output,
            resume=bool(resume),
            distributed=bool(distributed),
        )

    @property
    def smallest_cutoff(self) -> float:
        return min(self.cutoffs)

    @property
    def sorted_cutoffs(self) -> list[float]:
        """Distinct cutoffs, smallest first: the order they are searched in."""
        return sorted(set(self.cutoffs))
