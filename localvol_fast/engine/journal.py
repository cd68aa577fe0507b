"""Resumable runs: an append-only JSON-lines journal of finished directions.

The first line holds the format, its version and the run's configuration: everything that decides the
result - the anchor and the preconditioner by an exact checksum of every element
(``tensor_checksum``), the measure, seed, cutoffs and search options, and the caller's ``run_info``
(the ``nn`` layer passes the cost's configuration there, and its evaluation data as
``run_info["data"] = fingerprint_tensors(every input, mask and target tensor of the batches, in
order)``). Every later line is one finished direction at one cutoff (index, radius, cost at the
radius, evaluations, status, and the direction's statistics from which its estimate follows exactly)
and a checksum of its own content and of the configuration, so a row edited, or copied from another
journal, is recognized.

A batch is written once every cutoff is done, direction by direction (all cutoffs of a direction on
consecutive lines), in one write flushed to disk: a run killed at any moment loses at most the batch in
flight, and what it leaves is a torn last line or a last direction with only some of its cutoffs, both
dropped on resume. Resuming refuses a journal of another configuration or format version, a row whose
checksum does not match and a direction written twice, and skips the directions already finished;
floats are written in their shortest exact form, so the resumed result is the uninterrupted one.
``n_samples`` is not part of the configuration: a finished run can be extended with more directions,
or read back with fewer (the first ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FORMAT = "localvol_fast.journal"
VERSION = 2  # 2: checksummed rows, full checksums of the anchor and preconditioner

_CHUNK = 1 << 20  # elements per step of tensor_checksum: its temporaries stay at 16 MiB
_MIX = 0x9E3779B97F4A7C15  # an odd constant: it spreads positions over all 64 bits
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _int64(value: int) -> int:
    """``value`` mod 2**64 as a signed int64 (what torch's wrapping int64 arithmetic holds)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def tensor_checksum(tensor: torch.Tensor) -> str:
    """An exact checksum of every element's bits (16 hex digits), equal on every device.

    sum_i w_i x_i mod 2**64 over the elements' bits x_i read as integers, with odd weights
    w_i = (2i + 1) * _MIX: an odd weight is invertible mod 2**64, so changing any single element always
    changes the sum. Computed on the tensor's device chunk by chunk (no full-size temporary) with one
    readback at the end. A non-contiguous tensor is copied once by ``reshape``.
    """
    flat = tensor.detach().reshape(-1)
    if flat.element_size() not in _INT_OF_SIZE:  # complex: its real and imaginary parts in turn
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()])
    n = min(_CHUNK, bits.numel())
    base = (torch.arange(n, dtype=torch.int64, device=bits.device) * 2 + 1) * _int64(_MIX)
    values = torch.empty_like(base)
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for lo in range(0, bits.numel(), _CHUNK):
        x = bits[lo : lo + _CHUNK]
        m = x.numel()
        # w_(lo+i) = w_i + 2 lo _MIX, so the chunk adds sum_i w_i x_i + 2 lo _MIX sum_i x_i
        total += values[:m].copy_(x).mul_(base[:m]).sum() + _int64(2 * lo * _MIX) * x.sum()
    return f"{int(total.item()) & ((1 << 64) - 1):016x}"


def fingerprint_tensors(tensors) -> str:
    """One checksum of a sequence of tensors (each one's dtype, shape and ``tensor_checksum``, in order);
    ``None`` entries (an absent mask) count as such. For ``run_info["data"]``: other data of the same
    shape gives another fingerprint."""
    parts = ["None" if t is None else f"{t.dtype}{tuple(t.shape)}:{tensor_checksum(t)}" for t in tensors]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:32]


def tensor_fingerprint(tensor: torch.Tensor) -> dict:
    """What a resumed run must match of a (D,) tensor (the anchor, the preconditioner)."""
    return {"dim": tensor.numel(), "dtype": str(tensor.dtype), "checksum": tensor_checksum(tensor)}


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def open_journal(output, config: dict, resume: bool, rank: int, world_size: int) -> "RunJournal":
    """The journal of this process: rank r of several writes its own file beside ``output``; a resumed
    run reads all of them."""
    path = Path(output)
    own = path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    others = [p for p in [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))] if p != own]
    return RunJournal(own, config, resume, extra_paths=others)


class RunJournal:
    """Appends finished directions to ``path``; with ``resume`` reads back the ones already there.

    ``config["cutoffs"]`` (if given) lists the cutoffs every direction is journaled at.
    """

    def __init__(self, path, config: dict, resume: bool, extra_paths=()):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # the form it takes once written
        self._config_hash = hashlib.sha256(_canonical(self.config).encode()).hexdigest()
        self.cutoffs = [float(c) for c in self.config.get("cutoffs", [])]
        self.finished: dict[float, dict[int, dict]] = {}
        self._seen: dict[tuple[float, int], tuple[Path, int, str]] = {}  # where each row was read
        self._pending: list[tuple[float, list[dict]]] = []  # this batch's cutoffs until all are done
        existing = [p for p in [self.path, *map(Path, extra_paths)] if p.exists() and p.stat().st_size > 0]
        if existing and not resume:
            raise FileExistsError(
                f"{existing[0]} already holds a run; pass resume=True (--resume) to continue it, or choose another "
                "output file"
            )
        for p in existing:
            self._read(p, own=p == self.path)
        if not (self.path.exists() and self.path.stat().st_size > 0):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write([{"format": FORMAT, "version": VERSION, "config": self.config}], mode="w")

    # ----- reading ------------------------------------------------------------------------------
    def _read(self, path: Path, own: bool) -> None:
        data = path.read_bytes()
        lines = data.split(b"\n")  # the part after the last newline is a torn line (or empty): dropped
        self._check_header(path, lines[0])
        rows, offset = [], len(lines[0]) + 1  # rows: (line number, offset of the line, row)
        for number, line in enumerate(lines[1:-1], start=2):
            if line.strip():
                rows.append((number, offset, self._parse_row(path, number, line)))
            offset += len(line) + 1
        keep = self._complete_prefix(path, rows)
        for number, _, row in rows[:keep]:
            self._add(path, number, row)
        if own and (keep < len(rows) or not data.endswith(b"\n")):
            # Cut what a killed run left unfinished, so that appended lines start on a line of their own
            # and no direction is written twice when it is run again.
            with open(path, "r+b") as handle:
                handle.truncate(rows[keep][1] if keep < len(rows) else len(data) - len(lines[-1]))

    def _check_header(self, path: Path, line: bytes) -> None:
        try:
            header = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a localvol_fast journal (its first line is not JSON)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else header
            raise ValueError(f"{path} is not a localvol_fast journal (format {found!r})")
        version = header.get("version", 1)  # version 1 wrote none
        if version != VERSION:
            older = "an older" if isinstance(version, int) and version < VERSION else "another"
            raise ValueError(
                f"{path} was written by {older} version of localvol_fast (journal version {version!r}; this one "
                f"reads version {VERSION}), whose rows cannot be checked; finish that run with the version that "
                "wrote it, or start a new journal"
            )
        if header.get("config") != self.config:
            theirs = header.get("config") if isinstance(header.get("config"), dict) else {}
            changed = sorted(k for k in set(theirs) | set(self.config) if theirs.get(k) != self.config.get(k))
            details = "; ".join(f"{k}: {theirs.get(k)!r} in the file, {self.config.get(k)!r} now" for k in changed[:5])
            raise ValueError(
                f"{path} was written by a run with a different configuration ({details}); refusing to resume"
            )

    def _parse_row(self, path: Path, number: int, line: bytes) -> dict:
        try:
            row = json.loads(line)
            check = row.pop("check")
            float(row["cutoff"]), int(row["index"])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError):
            row, check = None, None
        if row is None or check != self._row_check(row):
            raise ValueError(
                f"{path}, line {number}: the row does not match its checksum (it was edited, damaged, or copied "
                "from a journal of another run); refusing to resume. Delete that line to run its direction again, "
                "or start a new journal"
            )
        row["check"] = check
        return row

    def _complete_prefix(self, path: Path, rows: list) -> int:
        """How many rows lie before a trailing direction that has only some of its cutoffs (a run killed
        mid-write); such a direction anywhere else means lines were removed."""
        if not self.cutoffs:
            return len(rows)
        count: dict[int, int] = {}
        for _, _, row in rows:
            count[int(row["index"])] = count.get(int(row["index"]), 0) + 1
        keep = len(rows)
        while keep and count[int(rows[keep - 1][2]["index"])] < len(self.cutoffs):
            keep -= 1
        for number, _, row in rows[:keep]:
            if count[int(row["index"])] < len(self.cutoffs):
                raise ValueError(
                    f"{path}, line {number}: direction {row['index']} has rows for only some of the cutoffs "
                    f"{self.cutoffs}, yet later directions follow (lines were removed); refusing to resume. "
                    "Delete its lines to run it again, or start a new journal"
                )
        return keep

    def _add(self, path: Path, number: int, row: dict) -> None:
        key = (float(row["cutoff"]), int(row["index"]))
        if key in self._seen:
            where, first, check = self._seen[key]
            # Every rank runs the pilot directions, so their rows come once per rank's file - identical.
            if where == path or check != row["check"]:
                raise ValueError(
                    f"{path}, line {number}: direction {key[1]} at cutoff {key[0]!r} is already on line {first} of "
                    f"{where}{'' if check == row['check'] else ' with other values'}; a journal holds each "
                    "direction once. Refusing to resume: delete the duplicate line, or start a new journal"
                )
            return
        self._seen[key] = (path, number, row["check"])
        self.finished.setdefault(key[0], {})[key[1]] = row

    def _row_check(self, row: dict) -> str:
        """A checksum of a row's content and of the configuration (a row cannot move between journals)."""
        return hashlib.sha256((self._config_hash + _canonical(row)).encode()).hexdigest()[:16]

    # ----- what it holds ------------------------------------------------------------------------
    def done_indices(self, cutoffs, n_samples: int | None = None) -> set[int]:
        """Directions finished at every one of ``cutoffs`` (among the first ``n_samples``, if given)."""
        sets = [set(self.finished.get(float(c), {})) for c in cutoffs]
        done = set.intersection(*sets) if sets else set()
        return done if n_samples is None else {i for i in done if i < n_samples}

    def records(self, cutoff: float, indices) -> list[dict]:
        rows = self.finished.get(float(cutoff), {})
        return [rows[i] for i in indices]

    # ----- writing ------------------------------------------------------------------------------
    def append(self, cutoff: float, records, estimates: torch.Tensor) -> None:
        """Journal one finished batch of ``DirectionRecords`` at ``cutoff``; once the batch is given at
        every cutoff of the configuration, write it, direction by direction, and flush it to disk.

        ``estimates`` are written for readers of the file; a resumed run recomputes them from the stats.
        """
        rows = [{"cutoff": cutoff, **row, "estimate": float(e)} for row, e in zip(records.to_rows(), estimates)]
        self._pending.append((float(cutoff), rows))
        if len(self._pending) < max(1, len(self.cutoffs)):
            return
        batch, self._pending = self._pending, []
        if self.cutoffs and [c for c, _ in batch] != self.cutoffs:
            raise RuntimeError(f"a batch was journaled at cutoffs {[c for c, _ in batch]}, expected {self.cutoffs}")
        lines = []
        for by_cutoff in zip(*(rows for _, rows in batch)):  # direction by direction
            for row in json.loads(json.dumps(list(by_cutoff))):  # checked in the form it is read back
                lines.append({**row, "check": self._row_check(row)})
        self._write(lines, mode="a")

    def _write(self, objects: list[dict], mode: str) -> None:
        with open(self.path, mode) as handle:
            handle.write("".join(json.dumps(o) + "\n" for o in objects))
            handle.flush()
            os.fsync(handle.fileno())
