"""Checkpoints of a sequential run: the sampler's whole state written as it goes, resumed exactly.

A sequential run is one chain of steps, not independent directions, so its "journal" is the latest
state (population, weights, log Z, temperatures, random stream), written with ``torch.save`` to a
temporary file and renamed over ``output`` (a crash mid-write keeps the previous checkpoint). It is
written at most every ``every_seconds`` and after the last step. Resuming checks the file's format,
the anchor's checksum, the run's options and the caller's ``run_info`` (what the cost depends on:
data, neighborhood, ...) before continuing, so the resumed run ends where the uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from localvol_fast.engine.journal import tensor_checksum
from localvol_fast.engine.sequential import SequentialSampler
from localvol_fast.engine.sequential_result import SequentialResult

_FORMAT = "localvol_fast.SequentialCheckpoint"
_VERSION = 1


def run_checkpointed(
    sampler: SequentialSampler, *, output, resume: bool, run_info: dict | None = None, progress: bool = False,
    every_seconds: float = 30.0,
) -> SequentialResult:
    """Run ``sampler`` to the end, saving its state to ``output`` (a path) and, with ``resume``, starting
    from the state already there. A file that exists without ``resume`` is refused (it holds a run)."""
    path = Path(output)
    identity = {"anchor": tensor_checksum(sampler.anchor), "dim": sampler.anchor.numel(), "run_info": run_info or {}}
    if path.exists() and path.stat().st_size > 0:
        if not resume:
            raise ValueError(
                f"{path} already holds a sequential run; pass resume=True (--resume) to continue it, or choose "
                "another output"
            )
        sampler.load_state_dict(_read(path, identity, sampler.anchor.device))
    last_saved = [time.monotonic()]

    def save_now_and_then(s: SequentialSampler) -> None:
        if time.monotonic() - last_saved[0] >= every_seconds:
            _write(path, identity, s)
            last_saved[0] = time.monotonic()

    result = sampler.run(progress=progress, on_step=save_now_and_then)
    _write(path, identity, sampler)
    return result


def _write(path: Path, identity: dict, sampler: SequentialSampler) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": _FORMAT, "version": _VERSION, "identity": identity, "state": sampler.state_dict()}, tmp)
    os.replace(tmp, path)


def _read(path: Path, identity: dict, device: torch.device) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path} is not a readable sequential checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT or saved.get("version") != _VERSION:
        raise ValueError(f"{path} is not a sequential checkpoint of this version of localvol_fast; refusing to resume")
    theirs = saved["identity"]
    differs = sorted(k for k in identity if theirs.get(k) != identity[k])
    if differs:
        raise ValueError(
            f"{path} was written for another run (its {', '.join(differs)} differ: other weights, data or settings); "
            "refusing to resume. Choose another output, or delete the file to start again"
        )
    state = saved["state"]
    if state.get("started"):  # the population goes back to the run's device; the random stream's state stays a CPU tensor
        state.update({n: None if state[n] is None else state[n].to(device) for n in SequentialSampler._TENSORS})
    return state
