"""The options of a run, checked once where they enter (``estimate`` or ``estimate_volume``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from localvol_fast.core.checks import (
    check_cutoffs, check_flag, check_integer, check_number, check_open_fraction, check_sample_count, check_seed,
    is_cutoff_list,
)


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
        cutoffs = tuple(check_cutoffs(cutoff))
        return cls(
            cutoffs=cutoffs,
            returns_list=is_cutoff_list(cutoff),
            # before anything is allocated per direction: a count that cannot be held is refused here
            n_samples=check_sample_count(n_samples, len(set(cutoffs))),
            seed=check_seed(seed),
            rtol=check_open_fraction(rtol, "rtol", "relative tolerance on |C - eps| / eps"),
            batch_size=None if batch_size is None else check_integer(batch_size, "batch_size", what="or None"),
            max_evals=check_integer(max_evals, "max_evals", what="cost evaluations per direction"),
            initial_radius=check_number(
                initial_radius, "initial_radius", minimum=0, inclusive=False, what="the first probe's radius"
            ),
            progress=check_flag(progress, "progress"),
            output=_checked_output(output),
            resume=check_flag(resume, "resume"),
            distributed=check_flag(distributed, "distributed"),
        )

    @property
    def smallest_cutoff(self) -> float:
        return min(self.cutoffs)

    @property
    def sorted_cutoffs(self) -> list[float]:
        """Distinct cutoffs, smallest first: the order they are searched in."""
        return sorted(set(self.cutoffs))


def _checked_output(output):
    """The journal: None or a file path (whether it can be written is found when it is opened)."""
    if output is None or isinstance(output, (str, os.PathLike)):
        return output
    raise TypeError(f"output must be None or a file path for the journal (e.g. 'run.jsonl'), got {type(output).__name__}")
