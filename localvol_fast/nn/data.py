"""Evaluation data in the forms users hold, turned into a fixed list of batches on the model's device.

Accepted: a tensor of inputs; an ``(inputs, targets)`` tuple; a dict or ``BatchEncoding`` with
``input_ids`` (and ``attention_mask``) for language models; or a list / iterable / DataLoader whose
items are any of those (an item may also be an ``[inputs, targets]`` list, or the one-element
``[inputs]`` list a ``DataLoader(TensorDataset(x))`` yields). The batches are materialized once, because
every cost evaluation reuses them.

Checked here, so that every evaluation path sees the same data and fails the same way: floating-point
inputs must be finite (a ValueError names the batch, the position and the value: NaN or inf inputs
make the anchor's own outputs undefined), and an attention mask must have the shape of its input_ids.
``check_token_ids`` checks token ids against a model's vocabulary.
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

    def tensors(self) -> list:
        """Every tensor the cost depends on, in a fixed order (None where there is none): for a journal's
        fingerprint of the data."""
        values = [*self.args, *self.kwargs.values(), self.targets, self.mask]
        return [v if isinstance(v, torch.Tensor) else None for v in values]


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
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch tensor of token ids, got {type(ids).__name__}; tokenize with "
            "return_tensors='pt'"
        )
    if ids.dim() >= 2 and ids.shape[0] > 0 and ids.shape[-1] == 0:
        raise ValueError(f"input_ids of shape {tuple(ids.shape)} hold no tokens; give each example at least one token")
    mask = encoding.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask has shape {shape} but input_ids has shape {tuple(ids.shape)}; pass the mask the "
            "tokenizer returned with these ids (one entry per token, 1 for real tokens, 0 for padding)"
        )
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
    if isinstance(item, (tuple, list)) and len(item) == 1 and isinstance(item[0], (torch.Tensor, Mapping)):
        return _one_batch(item[0])  # DataLoader(TensorDataset(x)) yields [x]
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


def _check_finite_inputs(batch: Batch, number: int) -> None:
    """Refuse NaN/inf in a batch's floating-point inputs, naming where the first one is."""
    named = [(f"input {k}", a) for k, a in enumerate(batch.args)] + list(batch.kwargs.items())
    for name, value in named:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        bad = ~torch.isfinite(value)
        if not bool(bad.any()):
            continue
        where = tuple(int(i) for i in bad.nonzero()[0])
        shown = float(value[where])
        row = f"row {where[0]}, " if where else ""
        raise ValueError(
            f"the evaluation data holds {shown!r} in batch {number} ({name}), {row}position {where}: NaN/inf inputs "
            "make the model's outputs at the anchor undefined (so fn(anchor) = nan/inf); remove or replace "
            f"those rows ({int(bad.sum())} non-finite values in this batch)"
        )


def check_token_ids(batches: list[Batch], vocab_size: int) -> None:
    """Token ids must lie in [0, vocab_size): an id outside indexes past the model's embedding."""
    for number, batch in enumerate(batches):
        ids = batch.kwargs.get("input_ids")
        if ids is None and batch.args and isinstance(batch.args[0], torch.Tensor) and not batch.args[0].is_floating_point():
            ids = batch.args[0]
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            continue
        bad = (ids < 0) | (ids >= vocab_size)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"token id {int(ids[where])} in batch {number} at position {where} is outside the model's vocabulary "
                f"of {vocab_size} (ids 0..{vocab_size - 1}; {int(bad.sum())} such ids in this batch); tokenize "
                "with this model's tokenizer"
            )


def prepare_batches(data, device, data_batch_size: int | None = None) -> tuple[list[Batch], list[str]]:
    """Normalize ``data`` into batches on ``device``; returns (batches, notes for the user).

    data_batch_size: rows per batch when ``data`` is one tensor or pair (checked by the caller: a
    positive int or None for ``DEFAULT_DATA_BATCH``).
    """
    notes = []
    # At the top level a tuple is one (inputs, targets) pair and a list is a sequence of batches;
    # inside an iterable, [inputs, targets] lists are pairs too (what a DataLoader yields).
    if isinstance(data, (torch.Tensor, Mapping)) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping))
    ):
        whole = _one_batch(data)
        _check_finite_inputs(whole, 0)  # before splitting, so rows are numbered in the data given
        batches = _split(whole, data_batch_size or DEFAULT_DATA_BATCH)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        batches = [_one_batch(item) for item in data]
        for number, batch in enumerate(batches):
            _check_finite_inputs(batch, number)
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
