"""Giving the user's model back exactly: weights, buffers, grads, train/eval modes and devices.

What comes back after a result, any exception, KeyboardInterrupt or SIGTERM: every module's
``_parameters`` and ``_buffers`` entries (the same objects, so tied weights stay one Parameter in both
places), each tensor's memory, dtype, device, strides and ``requires_grad``, its values bit for bit,
each parameter's ``.grad`` object, and every module's ``training`` flag.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch


class Terminated(SystemExit):
    """SIGTERM arrived during a run: raised in the main thread so the model is restored before exiting
    (uncaught, the process still exits, with the status 143 a SIGTERM death reports)."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "the run was stopped by SIGTERM (the model was given back as it was)"


def check_runnable_device(model: torch.nn.Module, device=None) -> None:
    """Refuse, before anything is moved, runs whose tensors cannot hold values: the meta device has
    shapes but no data, so a model moved there loses its weights and one already there cannot run."""
    if device is not None and torch.device(device).type == "meta":
        raise ValueError(
            "device='meta' cannot run a model: meta tensors have shapes but no values, so nothing can be "
            "evaluated there (and moving the weights there would lose them); pass a real device such as 'cpu' or 'cuda'"
        )
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        more = f" and {len(on_meta) - 5} more" if len(on_meta) > 5 else ""
        raise ValueError(
            f"the model has tensors on the meta device, which hold no values and cannot be evaluated: "
            f"{', '.join(on_meta[:5])}{more}; load or materialize their weights on a real device first "
            "(e.g. model.to_empty(device='cpu') then load_state_dict)"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for a bit-exact comparison (NaN payloads and -0.0 count)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat


def _same_bits(current: torch.Tensor, saved: torch.Tensor) -> bool:
    return current.dtype == saved.dtype and current.shape == saved.shape and torch.equal(
        _bits(current), _bits(saved.to(current.device))
    )


def _layout_of(t: torch.Tensor) -> tuple:
    """What identifies a tensor's memory and how it is read: moved, cast or re-strided data differs."""
    return (t.device, t.dtype, t.shape, t.stride(), t.storage_offset(), t.data_ptr() if not t.is_meta else None)


class _TensorRecord:
    """One tensor object of the model (a parameter, buffer or grad): its data and, unless the caller
    restores it itself, a copy of its values."""

    def __init__(self, tensor: torch.Tensor, keep_values: bool):
        self.tensor = tensor
        self.data = tensor.data  # the original memory: put back as it was if the run moved or cast it
        self.layout = _layout_of(tensor)
        self.requires_grad = tensor.requires_grad
        self.values = tensor.detach().clone() if keep_values and not tensor.is_meta else None

    @torch.no_grad()
    def restore(self) -> None:
        t = self.tensor
        if _layout_of(t) != self.layout:
            t.data = self.data
        if t.requires_grad != self.requires_grad and t.is_leaf:
            t.requires_grad_(self.requires_grad)
        # Compared first: an unneeded write would bump the version counter of a tensor saved for backward.
        if self.values is not None and not _same_bits(t, self.values):
            t.detach().copy_(self.values.to(t.device))


class ModelRecord:
    """Everything ``restore`` puts back (module docstring). ``skip``: parameter names whose values the
    caller restores itself (the in-place evaluator's anchor copy), so no second copy is kept here."""

    def __init__(self, model: torch.nn.Module, skip=()):
        skip = set(skip)
        self.skipped = {id(p) for n, p in model.named_parameters() if n in skip}
        self.modules = list(model.modules())
        self.modes = [m.training for m in self.modules]
        self.slots = [(dict(m._parameters), dict(m._buffers)) for m in self.modules]
        self.tensors: dict[int, _TensorRecord] = {}  # by id: a tied tensor is recorded (and restored) once
        self.grads: dict[int, torch.Tensor | None] = {}
        for m in self.modules:
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None:
                    self._record(t, owner=t)
        for t in [r.tensor for r in list(self.tensors.values()) if r.tensor.is_leaf]:  # only leaves have grads
            self.grads[id(t)] = t.grad
            if t.grad is not None:
                self._record(t.grad, owner=t)

    def _record(self, t: torch.Tensor, owner: torch.Tensor) -> None:
        if id(t) not in self.tensors:  # a skipped parameter's grad is not copied either
            self.tensors[id(t)] = _TensorRecord(t, keep_values=id(owner) not in self.skipped)

    def restore(self) -> None:
        """Slots first (the original objects back in place), then each tensor's memory and values, then
        grads (a grad must match its parameter's device), then modes; each step runs even if one fails."""
        steps = [self._restore_slots, self._restore_tensors, self._restore_grads, self._restore_modes]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - later steps still run; the first failure is raised
                errors.append(error)
        if errors:
            raise errors[0]

    def _restore_slots(self) -> None:
        for m, (parameters, buffers) in zip(self.modules, self.slots):
            for live, saved in ((m._parameters, parameters), (m._buffers, buffers)):
                # By identity: ``==`` on tensors compares values.
                if list(live) != list(saved) or any(live[k] is not v for k, v in saved.items()):
                    live.clear()
                    live.update(saved)

    def _restore_tensors(self) -> None:
        for record in self.tensors.values():
            record.restore()

    def _restore_grads(self) -> None:
        for record in self.tensors.values():
            t = record.tensor
            if id(t) in self.grads and t.grad is not self.grads[id(t)]:
                t.grad = self.grads[id(t)]

    def _restore_modes(self) -> None:
        for module, training in zip(self.modules, self.modes):
            module.training = training


@contextlib.contextmanager
def sigterm_raises():
    """For the block's duration, a SIGTERM raises ``Terminated`` in the main thread (so ``finally``
    blocks run) instead of killing the process outright. Only the default action is replaced: a
    handler of the user's, or SIG_IGN, stays as it is; outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """A SIGTERM during restoration waits until it is done (then raises ``Terminated``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if pending:
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:
            raise Terminated()


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module, device=None, restored_elsewhere=()):
    """Run in eval mode (on ``device``), then give the model back exactly (module docstring).

    A model or device that cannot run (meta) is refused before anything is touched.
    ``restored_elsewhere``: names of parameters the caller restores itself (from its anchor copy), so
    that no second full copy of a large model is kept here. Restoring never hides the exception that
    ended the run.
    """
    check_runnable_device(model, device)
    record = ModelRecord(model, skip=restored_elsewhere)
    moved = device is not None and any(r.tensor.device != torch.device(device) for r in record.tensors.values())
    with sigterm_raises():
        try:
            if moved:
                model.to(device)
            model.eval()
            yield model
        finally:
            with _signals_deferred():
                record.restore()
