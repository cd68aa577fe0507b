"""The paper's digits MLP, trained in-process on scikit-learn's bundled digits (no downloads).

64 -> 64 GELU -> 10 (D = 4,810), 1,024 training points, the other 773 held out; full-batch Adam,
lr 0.05, L2 penalty (lambda / 2) |theta|^2 with lambda = 5e-4, so the matching Gaussian prior has
sigma = 1 / sqrt(lambda * N_train). Optional label poisoning replaces a fraction of the training
labels by random wrong ones (the paper's "poisoned, badly generalizing" network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

N_TRAIN = 1024
L2 = 5e-4
LEARNING_RATE = 0.05
PRIOR_SIGMA = 1.0 / math.sqrt(L2 * N_TRAIN)


def load_digits_split(seed: int = 0, device="cpu"):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a seeded split 1,024 / 773."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'localvol_fast[demo]'") from error
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def digits_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))


def poison_labels(y: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Replace ``fraction`` of the labels by a different, random class."""
    gen = torch.Generator().manual_seed(seed + 1)
    y = y.clone()
    chosen = torch.randperm(y.numel(), generator=gen)[: int(round(fraction * y.numel()))]
    shift = torch.randint(1, 10, (chosen.numel(),), generator=gen).to(y.device)
    y[chosen] = (y[chosen] + shift) % 10
    return y


@dataclass
class TrainedDigits:
    model: torch.nn.Sequential
    optimizer: torch.optim.Adam
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def accuracy(self, x=None, y=None) -> float:
        x = self.x_test if x is None else x
        y = self.y_test if y is None else y
        with torch.no_grad():
            return float((self.model(x).argmax(-1) == y).float().mean())


def train_digits(steps: int = 500, *, poison_fraction: float = 0.0, seed: int = 0, device="cpu") -> TrainedDigits:
    """Train the paper's MLP full-batch with Adam (lr 0.05) and the L2 penalty; a few seconds on a CPU."""
    x_train, y_train, x_test, y_test = load_digits_split(seed, device)
    if poison_fraction:
        y_train = poison_labels(y_train, poison_fraction, seed)
    model = digits_mlp(seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    train_full_batch(model, optimizer, x_train, y_train, steps)
    return TrainedDigits(model, optimizer, x_train, y_train, x_test, y_test)


def train_full_batch(model, optimizer, x, y, steps: int) -> None:
    """``steps`` full-batch steps on cross-entropy + (L2 / 2) |theta|^2; leaves the model in eval mode."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        penalty = 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        (loss + penalty).backward()
        optimizer.step()
    model.eval()
