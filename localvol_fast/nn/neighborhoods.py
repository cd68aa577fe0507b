"""Neighborhood costs C(theta) of a model on evaluation batches (MATH.md, "The quantity").

KL: the mean over evaluation positions (examples, or non-padding tokens) of KL(p_anchor || p_theta)
over the last (class / vocabulary) dimension. Loss: L(theta) - L(theta0) for a user loss, the mean
over examples. Each neighborhood caches what it needs from the anchor once (``prepare``); per batch,
``per_probe`` runs inside the (vmapped) forward of each probe and ``combine`` turns the stacked
values of k probes into k sums of per-position costs, so that
C = sum over batches of those sums / sum of ``weight``.
"""

from __future__ import annotations

import torch


def output_logits(outputs) -> torch.Tensor:
    """The logits of a model's outputs: the tensor itself, or ``outputs.logits`` (Hugging Face)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"the model returned {type(outputs).__name__}; the KL neighborhood needs a logits tensor or an object "
        "with a .logits tensor"
    )


def check_class_logits(logits: torch.Tensor) -> None:
    """The KL neighborhood's output contract: logits (..., classes) with at least 2 classes and a batch
    dimension. A softmax over one class is 1 at every weight (the KL is 0 everywhere, every direction
    unbounded), and a 1-D output would be one softmax over the batch: both are refused, not computed."""
    shape = tuple(logits.shape)
    if logits.dim() < 2:
        raise ValueError(
            f"the KL neighborhood needs (N, classes) logits, but the model returned shape {shape}: a 1-D output "
            "would be read as one distribution over the batch; return (N, classes) logits (two columns for a "
            "binary classifier), or use neighborhood='loss' with a loss_fn"
        )
    if shape[-1] < 2:
        raise ValueError(
            f"the KL neighborhood needs at least 2 classes in the last dimension of the logits, but the model "
            f"returned shape {shape}: a softmax over {shape[-1]} class(es) does not change with the weights, so "
            "the KL would be 0 everywhere; output logits for every class (two for a binary classifier), or use "
            "neighborhood='loss' with a loss_fn (e.g. binary_cross_entropy_with_logits)"
        )


def _position_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or logits.dim() < 3:
        return None
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the logits have {tuple(logits.shape)}")
    return mask


class KLNeighborhood:
    """C(theta) = mean over positions of KL(p_anchor || p_theta); the anchor's log-probs are cached.

    Inside the (vmapped) forward only the logits are kept; the KL of all probes is then one call of the
    backend's ``kl_against_anchor`` kernel, which never materializes a log-softmax of the logits.
    """

    name = "kl"

    @staticmethod
    def anchor_log_probs(anchor_outputs) -> torch.Tensor:
        """The cached anchor outputs, (1, positions, vocab) float32 log-probabilities."""
        logits = output_logits(anchor_outputs).detach()
        return torch.log_softmax(logits.float(), dim=-1).reshape(1, -1, logits.shape[-1])

    def prepare(self, anchor_outputs, batch) -> dict:
        logits = output_logits(anchor_outputs).detach()
        check_class_logits(logits)
        log_probs = self.anchor_log_probs(logits)
        mask = _position_mask(logits, batch.mask)
        mask = None if mask is None else mask.reshape(1, -1)
        n_positions = log_probs.shape[1] if mask is None else int(mask.sum())
        # float32 rounding in sum_v p (a - l) is about eps32 * sum_v p |a| per position (summed here).
        magnitude = (log_probs.exp() * log_probs.abs()).sum(-1)
        if mask is not None:
            magnitude = magnitude * mask
        noise = float(magnitude.sum()) * torch.finfo(torch.float32).eps
        return {
            "noise": noise,
            "log_probs": log_probs,
            "mask": mask,
            "weight": float(n_positions),
            "elements": log_probs.numel(),
        }

    @staticmethod
    def per_probe(outputs, batch):
        return output_logits(outputs)

    @staticmethod
    def combine(logits: torch.Tensor, cache: dict, backend) -> torch.Tensor:
        """Sum over positions of KL(anchor || softmax(logits)) for each probe: logits (k, ...) -> (k,)."""
        k = logits.shape[0]
        flat = logits.reshape(k, -1, logits.shape[-1])
        anchor = cache["log_probs"].expand(k, -1, -1)
        mask = None if cache["mask"] is None else cache["mask"].expand(k, -1)
        positions = flat.shape[1] if mask is None else cache["weight"]
        return backend.kl_against_anchor(flat, anchor, mask).double() * positions


class LossNeighborhood:
    """C(theta) = L(theta) - L(theta0), L the mean over examples of ``loss_fn(outputs, targets)``."""

    name = "loss"

    def __init__(self, loss_fn):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def prepare(self, anchor_outputs, batch) -> dict:
        if batch.targets is None:
            raise ValueError(
                "the loss neighborhood needs targets: pass data as (inputs, targets) pairs or dicts with 'labels'"
            )
        anchor_loss = self.per_probe(anchor_outputs, batch).detach().double()
        return {"anchor_loss": anchor_loss, "weight": float(batch.n_rows)}

    def per_probe(self, outputs, batch) -> torch.Tensor:
        value = self.loss_fn(outputs, batch.targets)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("loss_fn(outputs, targets) must return a scalar tensor (the mean loss of the batch)")
        return value.reshape(())

    @staticmethod
    def combine(losses: torch.Tensor, cache: dict, backend) -> torch.Tensor:
        return (losses.double() - cache["anchor_loss"]) * cache["weight"]


def make_neighborhood(neighborhood: str, loss_fn):
    if neighborhood == "kl":
        if loss_fn is not None:
            raise ValueError("loss_fn is used by neighborhood='loss'; pass neighborhood='loss' or drop loss_fn")
        return KLNeighborhood()
    if neighborhood == "loss":
        if loss_fn is None:
            raise ValueError("neighborhood='loss' needs loss_fn(outputs, targets), e.g. torch.nn.functional.cross_entropy")
        return LossNeighborhood(loss_fn)
    raise ValueError(f"neighborhood must be 'kl' or 'loss', got {neighborhood!r}")
