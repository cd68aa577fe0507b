"""``SequentialResult``: what a run of ``sequential_volume`` found, and how to save and load it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from localvol_fast.core.result import check_saved_format
from localvol_fast.core.statistics import t_quantile

_FORMAT = "localvol_fast.SequentialResult"
_FORMAT_VERSION = 1
def replicate_interval(log_estimates: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(log-mean-exp, low, high) of R independent replicates' log P estimates (nats).

    The interval is centred on the log-mean-exp with half-width t_(R-1) x sd(log P_r) / sqrt(R): a
    t-interval on the log scale, where replicates' errors are close to Gaussian. NaN bounds for R < 2.
    """
    values = torch.tensor(log_estimates, dtype=torch.float64)
    if values.numel() == 0 or bool(torch.isnan(values).any()):
        return math.nan, math.nan, math.nan
    center = float(torch.logsumexp(values, 0)) - math.log(values.numel())
    if values.numel() < 2:
        return center, math.nan, math.nan
    if not bool(torch.isfinite(values).all()):  # a replicate saw no point inside: no lower bound
        return center, -math.inf, math.nan
    half = t_quantile(level, values.numel() - 1) * float(values.std()) / math.sqrt(values.numel())
    return center, center - half, center + half


@dataclass
class SequentialResult:
    """The log volumes (nats) of {theta : C(theta) <= c} under the measure, at each requested cutoff c.

    cutoffs: in the order asked; log_volumes, intervals (95%, from the replicates' spread) and
    replicate_log_volumes ((R,) per cutoff) line up with them (NaN where the run stopped before a
    cutoff). curve_cutoffs / curve_log_volumes: the estimate at every tempering step passed, at the
    cutoff equal to that step's mean cost (a volume-vs-cutoff curve from one run). steps: per-step
    diagnostics (phase, beta, alpha, ess, acceptance, move size). evaluations: cost evaluations (points).
    complete: False when the evaluation budget ran out first. notes: the sampler's warnings; info: free
    for the calling layer (model, data, timings), as ``VolumeResult.info``.
    """

    cutoffs: list[float]
    log_volumes: list[float]
    intervals: list[tuple[float, float]]
    replicate_log_volumes: list[list[float]]
    curve_cutoffs: list[float]
    curve_log_volumes: list[float]
    evaluations: int
    seconds: float
    steps: list[dict]
    dim: int
    measure: dict
    config: dict = field(default_factory=dict)
    complete: bool = True
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what the caller's layer adds (as ``VolumeResult.info``)

    @property
    def log_volume(self) -> float:
        """The log volume at the first requested cutoff (nats)."""
        return self.log_volumes[0]

    @property
    def log_volume_interval(self) -> tuple[float, float]:
        return tuple(self.intervals[0])

    def summary(self) -> str:
        lines = [
            f"sequential volume  D={self.dim:,}  measure={self.measure.get('name')}  scope={self.config.get('scope')}"
            f"  replicates={self.config.get('n_replicates')} x {self.config.get('n_particles')} particles",
        ]
        for c, v, (low, high) in zip(self.cutoffs, self.log_volumes, self.intervals):
            lines.append(f"  cutoff {c:g}: log volume {v:.6g} nats   95% interval [{low:.6g}, {high:.6g}]")
        lines.append(f"  evaluations {self.evaluations:,}  steps {len(self.steps)}  seconds {self.seconds:.3g}")
        if not self.complete:
            lines.append("  INCOMPLETE: the evaluation budget ran out before every cutoff was reached")
        lines += [f"  note: {n}" for n in self.notes + list(self.info.get("notes", []))]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SequentialResult(log_volumes={self.log_volumes}, cutoffs={self.cutoffs}, evaluations={self.evaluations})"

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SequentialResult":
        check_saved_format(data, _FORMAT, _FORMAT_VERSION)
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"the saved SequentialResult lacks the field(s) {missing}; the file is incomplete or edited")
        kwargs = {k: data[k] for k in names}
        kwargs["intervals"] = [tuple(i) for i in kwargs["intervals"]]
        return cls(**kwargs)

    def save(self, path) -> Path:
        """Write the result as JSON (inf and NaN as JSON's Infinity/NaN)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "SequentialResult":
        return cls.from_dict(json.loads(Path(path).read_text()))
