"""Evaluation data in the forms users hold, turned into a fixed list of batches on the model's device.

Accepted: a tensor of inputs; an ``(inputs, targets)`` tuple; a dict or ``BatchEncoding`` with
``input_ids`` (and ``attention_mask``) for language models; or a list / iterable / DataLoader whose
items are any of those (an item may also be an ``[inputs, targets]`` list, as DataLoaders yield). The batches are materialized once, because every cost evaluation reuses them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

DEFAULT_DATA_BATCH = 4096  # rows per batch when a single tensor is given


@dataclass
class Batch:
    """One batch: ``model(*args, **kwargs)``; ``targets`` for a loss; ``mask`` (N, T) marks real tokens."""

    args: tuple
    kwargs: dict
    targets: object = None
    mask: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0])


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _lm_batch(encoding: Mapping) -> Batch:
    if "input_ids" not in encoding:
        raise ValueError(f"a dict of data needs 'input_ids' (language-model batches); got keys {sorted(encoding)}")
    ids = encoding["input_ids"]
    mask = encoding.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    return Batch(args=(), kwargs=kwargs, targets=encoding.get("labels"), mask=mask.bool())


def _one_batch(item) -> Batch:
    if isinstance(item, torch.Tensor):
        return Batch(args=(item,), kwargs={})
    if isinstance(item, Mapping):
        return _lm_batch(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (torch.Tensor, Mapping)):
        inner = _one_batch(item[0])
        inner.targets = item[1]
        return inner
    raise TypeError(
        "each batch must be a tensor of inputs, an (inputs, targets) pair, or a dict with 'input_ids'; "
        f"got {type(item).__name__}"
    )


def _split(batch: Batch, size: int) -> list[Batch]:
    n = batch.n_rows
    if n <= size:
        return [batch]
    pieces = []
    for lo in range(0, n, size):
        cut = lambda v: v[lo : lo + size] if isinstance(v, torch.Tensor) else v  # noqa: E731
        pieces.append(
            Batch(
                args=tuple(cut(a) for a in batch.args),
                kwargs={k: cut(v) for k, v in batch.kwargs.items()},
                targets=cut(batch.targets),
                mask=cut(batch.mask),
            )
        )
    return pieces


def prepare_batches(data, device, data_batch_size: int | None = None) -> tuple[list[Batch], list[str]]:
    """Normalize ``data`` into batches on ``device``; returns (batches, notes for the user)."""
    notes = []
    # At the top level a tuple is one (inputs, targets) pair and a list is a sequence of batches;
    # inside an iterable, [inputs, targets] lists are pairs too (what a DataLoader yields).
    if isinstance(data, (torch.Tensor, Mapping)) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping))
    ):
        batches = _split(_one_batch(data), data_batch_size or DEFAULT_DATA_BATCH)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        batches = [_one_batch(item) for item in data]
    else:
        raise TypeError(
            "data must be a tensor of inputs, an (inputs, targets) pair, a dict/BatchEncoding with 'input_ids', "
            f"or an iterable of such batches; got {type(data).__name__}"
        )
    batches = [b for b in batches if b.n_rows > 0]
    if not batches:
        raise ValueError("the evaluation data is empty: the neighborhood needs at least one example")
    device = torch.device(device)
    moved = False
    for b in batches:
        tensors = [*b.args, *b.kwargs.values()]
        if any(isinstance(t, torch.Tensor) and t.device != device for t in tensors):
            moved = True
        b.args, b.kwargs = _to(b.args, device), _to(b.kwargs, device)
        b.targets, b.mask = _to(b.targets, device), _to(b.mask, device)
    if moved:
        note = f"the evaluation data was moved to the model's device ({device})"
        notes.append(note)
        warnings.warn(note, stacklevel=3)
    return batches, notes
