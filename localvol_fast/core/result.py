"""``VolumeResult``: the per-direction estimates of a run and what is derived from them."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

_FORMAT = "localvol_fast.VolumeResult"
_FORMAT_VERSION = 1
_TENSOR_FIELDS = {
    "estimates": torch.float64,
    "radii": torch.float64,
    "deltas": torch.float64,
    "props": torch.float64,
    "n_evals": torch.int64,
    "indices": torch.int64,
    "nonmonotone": torch.bool,
}


def log_mean_exp(values: torch.Tensor) -> float:
    """log(mean(exp(values))) computed stably; -inf for an empty or all -inf input, +inf if any is +inf."""
    values = values.double()
    if values.numel() == 0:
        return -math.inf
    return float(torch.logsumexp(values, 0)) - math.log(values.numel())


@dataclass
class VolumeResult:
    """Per-direction results of a local-volume run (all tensors (n,), float64 unless noted).

    estimates: log of each direction's importance-weighted volume estimate, in nats.
    radii: distance along the unit direction where the cost reaches the cutoff (inf: never, within the
        measure's reach). deltas: the cost measured at the final probe. props: |P u|, the length of the
        preconditioned unit vector. status: one name per direction (see ``core.search.STATUS_NAMES``).
    n_evals: cost evaluations per direction (int64). indices: the directions' stream indices (int64).
    nonmonotone: directions whose cost was seen to decrease along the ray (bool).
    """

    estimates: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    props: torch.Tensor
    status: list[str]
    n_evals: torch.Tensor
    indices: torch.Tensor
    nonmonotone: torch.Tensor
    dim: int
    cutoff: float
    measure: dict
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    # ----- derived quantities -------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.estimates.numel())

    @property
    def log_volume(self) -> float:
        """log of the estimated volume (nats): log-mean-exp of the per-direction estimates."""
        return log_mean_exp(self.estimates)

    @property
    def log10_volume(self) -> float:
        return self.log_volume / math.log(10.0)

    @property
    def effective_sample_size(self) -> float:
        """(sum w)^2 / sum w^2 of the importance weights w = exp(estimates): 1 means one direction dominates."""
        finite = self.estimates[torch.isfinite(self.estimates)]
        if bool((self.estimates == math.inf).any()):
            return float((self.estimates == math.inf).sum())
        if finite.numel() == 0:
            return 0.0
        w = torch.exp(finite - finite.max())
        return float(w.sum() ** 2 / (w * w).sum())

    def interval(self, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of ``log_volume`` (resampling directions), reproducible by seed."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        n = self.n_samples
        if n == 0:
            return (math.nan, math.nan)
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, n, (n_resamples, n), generator=generator)
        boots = torch.logsumexp(self.estimates.double()[picks], dim=1) - math.log(n)
        finite = boots[~torch.isnan(boots)]
        low, high = torch.quantile(finite, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
        return (float(low), float(high))

    @property
    def log_volume_interval(self) -> tuple[float, float]:
        """The bootstrap 95% interval of ``log_volume`` (nats)."""
        return self.interval(0.95)

    @property
    def evals_per_direction(self) -> float:
        return float(self.n_evals.double().mean()) if self.n_samples else math.nan

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(self.status))

    def summary(self) -> str:
        low, high = self.log_volume_interval
        ln10 = math.log(10.0)
        lines = [
            f"local volume  D={self.dim:,}  cutoff={self.cutoff:g}  measure={self.measure.get('name')}"
            f"  directions={self.n_samples}",
            f"  log volume      {self.log_volume:.6g} nats   (log10 {self.log10_volume:.6g})",
            f"  95% interval    [{low:.6g}, {high:.6g}] nats   (log10 [{low / ln10:.6g}, {high / ln10:.6g}])",
            f"  effective sample size {self.effective_sample_size:.3g} of {self.n_samples}",
            f"  evaluations per direction {self.evals_per_direction:.3g}",
            "  status  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.status_counts().items())),
        ]
        if bool(self.nonmonotone.any()):
            lines.append(f"  non-monotone costs seen on {int(self.nonmonotone.sum())} directions")
        for note in self.info.get("notes", []):
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"VolumeResult(log_volume={self.log_volume:.6g}, log10_volume={self.log10_volume:.6g}, "
            f"n_samples={self.n_samples}, dim={self.dim}, cutoff={self.cutoff:g})"
        )

    # ----- saving and loading -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict; floats survive a round trip exactly (Python writes the shortest repr)."""
        data = {"format": _FORMAT, "version": _FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.tolist() if isinstance(value, torch.Tensor) else value
        data["log_volume"] = self.log_volume  # for readers of the file; recomputed on load
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VolumeResult":
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a saved VolumeResult (format {data.get('format')!r})")
        kwargs = {}
        for f in fields(cls):
            value = data[f.name]
            if f.name in _TENSOR_FIELDS:
                value = torch.tensor(value, dtype=_TENSOR_FIELDS[f.name]).reshape(-1)
            kwargs[f.name] = value
        return cls(**kwargs)

    def save(self, path) -> Path:
        """Write the result as JSON (lossless; inf and NaN as JSON's Infinity/NaN)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # a crash mid-write never leaves a truncated result behind
        return path

    @classmethod
    def load(cls, path) -> "VolumeResult":
        return cls.from_dict(json.loads(Path(path).read_text()))
