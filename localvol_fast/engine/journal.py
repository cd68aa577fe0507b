"""Resumable runs: an append-only JSON-lines journal of finished directions.

The first line holds the run's configuration; every later line one finished direction at one cutoff
(index, radius, cost at the radius, evaluations, status, and the direction's statistics from which its
estimate follows exactly). Lines are written a batch at
a time and flushed to disk, so a run killed at any moment loses at most the batch in flight. Resuming
reads the journal back, refuses one written with another configuration, drops a torn last line, and
skips the directions already finished; floats are written in their shortest exact form, so the
resumed result is the uninterrupted one. ``n_samples`` is not part of the configuration: a finished
run can be extended with more directions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

FORMAT = "localvol_fast.journal"


def anchor_fingerprint(anchor: torch.Tensor) -> dict:
    """A cheap, exact summary of the anchor that a resumed run must match."""
    flat = anchor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].double().cpu()
    return {"dim": flat.numel(), "dtype": str(flat.dtype), "sample_sum": float(sample.sum()), "sample_sq": float((sample * sample).sum())}


def open_journal(output, config: dict, resume: bool, rank: int, world_size: int) -> "RunJournal":
    """The journal of this process: rank r of several writes its own file beside ``output``; a resumed
    run reads all of them."""
    path = Path(output)
    own = path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    others = [p for p in [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))] if p != own]
    return RunJournal(own, config, resume, extra_paths=others)


class RunJournal:
    """Appends finished directions to ``path``; with ``resume`` reads back the ones already there."""

    def __init__(self, path, config: dict, resume: bool, extra_paths=()):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # the form it takes once written
        self.finished: dict[float, dict[int, dict]] = {}
        existing = [p for p in [self.path, *map(Path, extra_paths)] if p.exists() and p.stat().st_size > 0]
        if existing and not resume:
            raise FileExistsError(
                f"{existing[0]} already holds a run; pass resume=True (--resume) to continue it, or choose another "
                "output file"
            )
        for p in existing:
            self._read(p)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._drop_torn_tail()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as handle:
                handle.write(json.dumps({"format": FORMAT, "config": self.config}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def _read(self, path: Path) -> None:
        lines = path.read_text().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not a localvol_fast journal (its first line is not JSON)") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a localvol_fast journal (format {header.get('format')!r})")
        if header["config"] != self.config:
            changed = sorted(k for k in set(header["config"]) | set(self.config) if header["config"].get(k) != self.config.get(k))
            details = "; ".join(f"{k}: {header['config'].get(k)!r} in the file, {self.config.get(k)!r} now" for k in changed[:5])
            raise ValueError(f"{path} was written by a run with a different configuration ({details}); refusing to resume")
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed run: that direction is simply run again
            self.finished.setdefault(float(row["cutoff"]), {})[int(row["index"])] = row

    def _drop_torn_tail(self) -> None:
        """Cut an incomplete last line, so that appended lines start on a line of their own."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def done_indices(self, cutoffs) -> set[int]:
        """Directions finished at every one of ``cutoffs``."""
        sets = [set(self.finished.get(float(c), {})) for c in cutoffs]
        return set.intersection(*sets) if sets else set()

    def records(self, cutoff: float, indices) -> list[dict]:
        rows = self.finished.get(float(cutoff), {})
        return [rows[i] for i in indices]

    def append(self, cutoff: float, records, estimates: torch.Tensor) -> None:
        """Write one finished batch of ``DirectionRecords`` for ``cutoff`` and flush it to disk.

        ``estimates`` are written for readers of the file; a resumed run recomputes them from the stats.
        """
        rows = records.to_rows()
        lines = [json.dumps({"cutoff": cutoff, **row, "estimate": float(e)}) for row, e in zip(rows, estimates)]
        with open(self.path, "a") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
