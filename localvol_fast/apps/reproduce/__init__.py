"""The paper's experiments: ``experiments`` (the runs), ``verdicts`` (the comparison with the paper),
``report`` (report.md and the plots)."""

from localvol_fast.apps.reproduce.experiments import reproduce_digits

__all__ = ["reproduce_digits"]
