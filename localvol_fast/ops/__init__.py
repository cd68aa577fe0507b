"""The inner-loop ops (contract: ``SPEC.md``) and the backends that implement them.

- ``reference``: pure PyTorch (``reference.py``), on any device; the ground truth.
- ``cpu`` / ``cuda``: the compiled C++ / CUDA C++ kernels of ``csrc/`` (``compiled.py``).
- ``triton``: the Triton kernels (``triton/``), on CUDA tensors, or on CPU tensors under
  ``TRITON_INTERPRET=1`` (slow; for tests).

``get_backend("auto", device)`` picks the fastest one available for the device: the compiled kernels
for it, else Triton on a GPU, else the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from localvol_fast.ops import reference

BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    """One implementation of every op; ``perturbed_linear`` exists only where a kernel fuses it."""

    name: str
    gaussian: Callable
    direction_stats: Callable
    perturb_: Callable
    kl_against_anchor: Callable
    perturbed_linear: Callable | None = None


def _reference() -> Backend:
    r = reference
    return Backend("reference", r.gaussian, r.direction_stats, r.perturb_, r.kl_against_anchor, r.perturbed_linear)


def _compiled(name: str) -> Backend:
    from localvol_fast.ops import compiled as c

    return Backend(name, c.gaussian, c.direction_stats, c.perturb_, c.kl_against_anchor)


def _triton() -> Backend:
    from localvol_fast.ops.triton import directions, kl, linear, stream

    return Backend(
        "triton", stream.gaussian, directions.direction_stats, directions.perturb_, kl.kl_against_anchor,
        linear.perturbed_linear,
    )


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if device.type != name:
            return f"backend {name!r} runs on {name} tensors, but the anchor is on {device}"
        if name == "cuda" and not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA device, and torch sees none"
        from localvol_fast.ops import compiled

        if not compiled.is_available(name):
            return f"the compiled {name} kernels are not built; {compiled.BUILD_HINT}"
        return None
    if name == "triton":
        from localvol_fast.ops.triton import common

        if not common.is_available():
            return "Triton is not usable here: it needs `pip install triton` and a CUDA device (or TRITON_INTERPRET=1)"
        if device.type == "cpu" and not common.interpreter_requested():
            return "the Triton kernels run on CPU tensors only in the interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"the Triton kernels do not run on {device}"
        return None
    return f"unknown backend {name!r}; choose from {('auto',) + BACKENDS}"


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device`` (default: the CPU, plus CUDA when a GPU is present)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [n for n in BACKENDS if any(_unavailable_reason(n, d) is None for d in devices)]


def get_backend(name: str = "auto", device=None) -> Backend:
    """The ``Backend`` named ``name`` for tensors on ``device``; "auto" picks the fastest available."""
    device = torch.device(device if device is not None else "cpu")
    if name == "auto":
        preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        name = next((n for n in preference if _unavailable_reason(n, device) is None), "reference")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    if name == "reference":
        return _reference()
    if name == "triton":
        return _triton()
    return _compiled(name)


__all__ = ["BACKENDS", "Backend", "available_backends", "get_backend", "reference"]
