"""Per-direction records of a run: what is kept of each finished direction, and the result built from them."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from localvol_fast.core.measures import DirectionStats
from localvol_fast.core.result import VolumeResult
from localvol_fast.core.search import CLIPPED, INFINITE_VOLUME, INTEGRATED_EXACTLY, UNBOUNDED, status_counts_text


_FLOAT_FIELDS = ("radii", "deltas", "slopes")
_RECORD_DTYPES = {
    "indices": torch.int64, "radii": torch.float64, "deltas": torch.float64, "n_evals": torch.int64,
    "nonmonotone": torch.bool, "slopes": torch.float64, "stats": torch.float64,
}


@dataclass
class DirectionRecords:
    """Finished directions (each field n rows): what a run keeps of each, in the order they finished.

    ``stats`` (n, 5) are the directions' ``DirectionStats``; the estimates are computed from them and
    the radii only when a result is assembled, over all directions at once, so that they never depend
    on how the directions were batched, sharded over processes or resumed.
    """

    indices: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    n_evals: torch.Tensor
    nonmonotone: torch.Tensor
    slopes: torch.Tensor
    stats: torch.Tensor
    status: list[str]

    @classmethod
    def of_search(cls, indices, stats: DirectionStats, outcome, measure_obj) -> "DirectionRecords":
        unbounded = torch.tensor([s == UNBOUNDED for s in outcome.status], dtype=torch.bool)
        radii, status = outcome.radii, list(outcome.status)
        if measure_obj.is_box:  # the ray ends at the box: the radius is its exit point
            status = [CLIPPED if s == UNBOUNDED else s for s in status]
        else:
            radii = torch.where(unbounded, torch.full_like(radii, math.inf), radii)
        columns = torch.stack([getattr(stats, f) for f in DirectionStats.__dataclass_fields__], dim=1)
        return cls(indices, radii, outcome.deltas, outcome.n_evals, outcome.nonmonotone, outcome.slopes, columns, status)

    def estimates(self, measure_obj, log_det_p: float) -> torch.Tensor:
        """Per direction: log ray measure - D log|P u| + log det P (nats)."""
        stats = DirectionStats.from_tensor(self.stats)
        return measure_obj.log_ray_measures(self.radii, stats) - measure_obj.dim * torch.log(stats.props) + log_det_p

    @classmethod
    def concat(cls, parts: list["DirectionRecords"]) -> "DirectionRecords":
        if not parts:
            empty = {f: torch.empty(0, dtype=d) for f, d in _RECORD_DTYPES.items()}
            empty["stats"] = torch.empty(0, 5, dtype=torch.float64)
            return cls(**empty, status=[])
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__ if f != "status"}
        return cls(**tensors, status=[s for p in parts for s in p.status])

    def by_index(self) -> "DirectionRecords":
        """The records sorted by direction index, each index once (pilot directions may come twice)."""
        order, seen = [], set()
        for k in sorted(range(self.indices.numel()), key=lambda k: int(self.indices[k])):
            if int(self.indices[k]) not in seen:
                seen.add(int(self.indices[k]))
                order.append(k)
        pick = torch.tensor(order, dtype=torch.int64)
        fields = {f: getattr(self, f)[pick] for f in self.__dataclass_fields__ if f != "status"}
        return DirectionRecords(**fields, status=[self.status[k] for k in order])

    # ----- journal rows: one JSON object per direction, floats in their shortest exact form ----------
    def to_rows(self) -> list[dict]:
        rows = []
        for k in range(self.indices.numel()):
            row = {"index": int(self.indices[k]), "status": self.status[k]}
            row.update({f: float(getattr(self, f)[k]) for f in _FLOAT_FIELDS})
            row["stats"] = self.stats[k].tolist()
            row["n_evals"] = int(self.n_evals[k])
            row["nonmonotone"] = bool(self.nonmonotone[k])
            rows.append(row)
        return rows

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "DirectionRecords":
        if not rows:
            return cls.concat([])
        fields = {"indices": torch.tensor([r["index"] for r in rows], dtype=torch.int64)}
        for f in _FLOAT_FIELDS:
            fields[f] = torch.tensor([r[f] for r in rows], dtype=torch.float64)
        fields["stats"] = torch.tensor([r["stats"] for r in rows], dtype=torch.float64).reshape(-1, 5)
        fields["n_evals"] = torch.tensor([r["n_evals"] for r in rows], dtype=torch.int64)
        fields["nonmonotone"] = torch.tensor([r["nonmonotone"] for r in rows], dtype=torch.bool)
        return cls(**fields, status=[r["status"] for r in rows])


def assemble_result(records: DirectionRecords, measure_obj, eps: float, log_det_p: float, info: dict) -> VolumeResult:
    """The ``VolumeResult`` of finished directions (sorted by index), with one summary warning for every
    direction that did not simply converge."""
    notes = [measure_obj.outside_reason] if getattr(measure_obj, "outside_reason", None) else []
    result = VolumeResult(
        estimates=records.estimates(measure_obj, log_det_p),
        radii=records.radii,
        deltas=records.deltas,
        props=DirectionStats.from_tensor(records.stats).props,
        status=records.status,
        n_evals=records.n_evals,
        indices=records.indices,
        nonmonotone=records.nonmonotone,
        dim=measure_obj.dim,
        cutoff=eps,
        measure=measure_obj.describe(),
        info={**info, "notes": notes},
    )
    _warn_once(result, measure_obj)
    return result


def _warn_once(result: VolumeResult, measure_obj) -> None:
    if measure_obj.name == "uniform" and not measure_obj.is_box:
        explanations = {UNBOUNDED: INFINITE_VOLUME}
    else:
        explanations = {UNBOUNDED: INTEGRATED_EXACTLY, CLIPPED: INTEGRATED_EXACTLY}
    problems = status_counts_text(result.status, explanations)
    if bool(result.nonmonotone.any()):
        problems.append(f"{int(result.nonmonotone.sum())} with non-monotone costs (first crossing used)")
    problems.extend(result.info["notes"])
    if problems:
        warnings.warn(
            f"local volume: of {result.n_samples} directions, " + "; ".join(problems) + ". See result.status.",
            RuntimeWarning,
            stacklevel=5,
        )
