"""``VolumeResult``: the per-direction estimates of a run and what is derived from them."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from localvol_fast.core.search import STATUS_NAMES

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
_INT64 = range(-(2**63), 2**63)


def _is_number(x) -> bool:  # bool is an int to Python, but never a figure of a saved result
    return isinstance(x, float) or (isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2.0**1023)


def _is_int64(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x in _INT64


# What each per-direction list of a saved result may hold, and how a message names it.
_ELEMENTS = {torch.float64: (_is_number, "numbers"), torch.int64: (_is_int64, "int64 integers"),
             torch.bool: (lambda x: isinstance(x, bool), "booleans"), str: (lambda x: x in STATUS_NAMES, "")}


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
        if self.n_samples == 0 or bool(torch.isnan(self.estimates).all()):
            return math.nan
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
        if finite.numel() == 0:  # every estimate NaN: there is no interval to give
            return (math.nan, math.nan)
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
        """The result ``to_dict`` wrote, every field checked: a ValueError names the first bad one."""
        check_saved_format(data, _FORMAT, _FORMAT_VERSION)
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"the saved VolumeResult lacks the field(s) {missing}; the file is incomplete or edited")
        n = len(data["estimates"]) if isinstance(data["estimates"], list) else None
        kwargs = {name: torch.tensor(_checked_list(data[name], name, n, dtype), dtype=dtype).reshape(-1)
                  for name, dtype in _TENSOR_FIELDS.items()}
        kwargs["status"] = _checked_list(data["status"], "status", n, str)
        dim, cutoff = data["dim"], data["cutoff"]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer (the number of parameters), got {dim!r}")
        if not (_is_number(cutoff) and math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a finite positive number, got {cutoff!r}")
        for name in ("measure", "config", "info"):
            if not isinstance(data[name], dict):
                raise ValueError(f"{name} must be a JSON object (a dict), got {type(data[name]).__name__}")
        return cls(
            **kwargs, dim=dim, cutoff=float(cutoff), measure=data["measure"], config=data["config"], info=data["info"]
        )

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


def check_saved_format(data, format_name: str, version: int) -> None:
    """Refuse anything but a dict written as ``format_name`` at ``version`` (e.g. "localvol_fast.VolumeResult", 1)."""
    what = format_name.rsplit(".", 1)[-1]
    if not isinstance(data, dict) or data.get("format") != format_name:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"not a saved {what} (format {found!r})")
    if data.get("version") != version:
        raise ValueError(
            f"a saved {what} of format version {data.get('version')!r}, but this version of localvol_fast "
            f"reads version {version}; load it with the version that wrote it"
        )


def _checked_list(value, name: str, n: int | None, kind) -> list:
    """``value`` if it is a flat list of ``n`` items of ``kind`` (a dtype, or str for status names),
    else a ValueError saying what is wrong."""
    is_item, what = _ELEMENTS[kind]
    what = what or f"status names (one of {list(STATUS_NAMES)})"
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of {what}, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise ValueError(
            f"{name} has {len(value)} entries but estimates has {n}; a saved result has one per direction in each"
        )
    for k, item in enumerate(value):
        if not is_item(item):
            raise ValueError(f"{name}[{k}] is {item!r}, but {name} must hold {what}; the file was edited or damaged")
    return value
