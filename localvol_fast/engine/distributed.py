"""Sharding directions over processes with PyTorch's own distributed runtime (``torchrun``).

Every process runs the pilot directions itself (they are few, and all processes need the typical
radius and slope they give), then the directions i >= pilot with (i - pilot) mod world_size == rank.
Each direction's search depends only on (seed, i) and the pilot, so after the results are gathered
on every rank the run equals a single-process run with the same seed, whatever the world size.
"""

from __future__ import annotations

import atexit
import os

import torch


def process_group(distributed: bool) -> tuple[int, int]:
    """(rank, world_size); with ``distributed`` joins (or initializes from torchrun's env) the group."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("distributed=True, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "distributed=True needs a process group: launch with torchrun (which sets RANK and WORLD_SIZE) "
                "or call torch.distributed.init_process_group first"
            )
        use_nccl = torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        # The group we created is ours to close: one left to the interpreter's teardown can abort the
        # process after the run has finished ("terminate called without an active exception", gloo).
        atexit.register(_close_process_group)
    return dist.get_rank(), dist.get_world_size()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def owns(index: int, rank: int, world_size: int, pilot: int) -> bool:
    """Whether this rank runs direction ``index`` (every rank runs the pilot)."""
    return index < pilot or (index - pilot) % world_size == rank


def gather(rows: list, world_size: int) -> list:
    """The concatenation of every rank's ``rows`` (any picklable items), on every rank."""
    if world_size == 1:
        return rows
    import torch.distributed as dist

    everyone = [None] * world_size
    dist.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part]
