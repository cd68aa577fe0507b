"""The paper's digits MLP, trained in-process on scikit-learn's bundled digits (no downloads).

64 -> 64 GELU -> 10 (D = 4,810), 1,024 training points, the other 773 held out, L2 penalty
(lambda / 2) |theta|^2 with lambda = 5e-4, so the matching Gaussian prior has sigma = 1 / sqrt(lambda *
N_train). Two recipes:

- ``train_paper_digits``: the paper's own (MATH.md, "The paper's digits setup"): tanh-GELU, weights and
  biases N(0, 1/fan_in), minibatches of 64 for 25 reshuffled epochs (400 steps), ``PaperAdam`` (eps 1e-8
  inside and outside the square root) with lr 0.05 cosine-decayed to 0. ``localvol reproduce digits`` and
  ``localvol demo`` use it.
- ``train_digits``: the older full-batch recipe (torch's default init and Adam, constant lr), kept
  because tests and benchmarks pin their figures on it.

Optional label poisoning replaces a fraction of the training labels by random wrong ones (the paper's
"poisoned, badly generalizing" network), in either recipe.
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
    optimizer: torch.optim.Optimizer  # torch Adam (train_digits) or PaperAdam (train_paper_digits)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def accuracy(self, x=None, y=None) -> float:
        x = self.x_test if x is None else x
        y = self.y_test if y is None else y
        with torch.no_grad():
            return float((self.model(x).argmax(-1) == y).float().mean())

    def raw_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) flattened in parameter order, as stored: NOT bias-corrected, which is
        what the paper's preconditioner reads."""
        states = [self.optimizer.state[p] for p in self.model.parameters()]
        first = torch.cat([s["exp_avg"].reshape(-1) for s in states])
        return first, torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])


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


# ----- the paper's recipe -----------------------------------------------------------------------
PAPER_BATCH = 64
PAPER_EPOCHS = 25
PAPER_STEPS = PAPER_EPOCHS * N_TRAIN // PAPER_BATCH  # 400
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def paper_mlp(seed: int = 0) -> torch.nn.Sequential:
    """64 -> 64 tanh-GELU -> 10 with weights AND biases drawn N(0, 1/fan_in) from a seeded generator
    (torch's default init draws biases uniformly and would give another network)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 10)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            std = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * std)
    return model


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """lr at 0-based ``step`` of a cosine decay from ``base_lr`` to 0 over ``total_steps`` (optax's
    ``cosine_decay_schedule``: the first update uses base_lr, the schedule reaches 0 at total_steps)."""
    fraction = min(step, total_steps) / total_steps
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * fraction))


class PaperAdam(torch.optim.Optimizer):
    """Adam as the paper's code runs it (optax ``scale_by_adam`` with ``eps_root``), written out here
    because torch's Adam has no eps inside the square root:

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2          (raw moments, kept in state)
        m_hat = m / (1 - b1^t),   v_hat = v / (1 - b2^t)            (t = 1, 2, ...)
        theta <- theta - lr(t - 1) * m_hat / (sqrt(v_hat + eps_root) + eps)

    with lr(k) = ``cosine_lr(lr, k, total_steps)``, eps = eps_root = 1e-8 and no weight decay (the L2
    term is in the loss). State per parameter uses torch Adam's keys (``step``, ``exp_avg``,
    ``exp_avg_sq``), so ``estimate(preconditioner="adam", optimizer=...)`` reads it as it is.
    """

    def __init__(self, params, lr=LEARNING_RATE, total_steps=PAPER_STEPS, betas=ADAM_BETAS, eps=ADAM_EPS, eps_root=ADAM_EPS):
        defaults = {"lr": lr, "total_steps": total_steps, "betas": betas, "eps": eps, "eps_root": eps_root}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                lr = cosine_lr(group["lr"], state["step"], group["total_steps"])
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1**t)
                v_hat = state["exp_avg_sq"] / (1 - b2**t)
                p.sub_(lr * m_hat / ((v_hat + group["eps_root"]).sqrt() + group["eps"]))


def paper_loss(model, x, y) -> torch.Tensor:
    """Mean cross-entropy + 0.5 * lambda * |theta|^2 (weights and biases alike)."""
    penalty = 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
    return torch.nn.functional.cross_entropy(model(x), y) + penalty


def train_paper_digits(
    seed: int = 0, *, poison_fraction: float = 0.0, stop_after: int | None = None, device="cpu"
) -> TrainedDigits:
    """The paper's recipe (module docstring); ``stop_after`` k < 400 stops after k steps of the same
    400-step schedule (a checkpoint of the same training run, for the trajectory experiment)."""
    x_train, y_train, x_test, y_test = load_digits_split(seed, device)
    if poison_fraction:
        y_train = poison_labels(y_train, poison_fraction, seed)
    model = paper_mlp(seed).to(device)
    optimizer = PaperAdam(model.parameters())
    limit = PAPER_STEPS if stop_after is None else min(int(stop_after), PAPER_STEPS)
    paper_minibatch_steps(model, optimizer, x_train, y_train, seed=seed, steps=limit)
    return TrainedDigits(model, optimizer, x_train, y_train, x_test, y_test)


def paper_minibatch_steps(model, optimizer, x_train, y_train, *, seed: int, steps: int) -> None:
    """``steps`` minibatch updates of ``paper_loss``, one fresh permutation of the training set per epoch;
    leaves no gradients behind and the model in eval mode."""
    # Its own generator: the epochs' shuffles do not depend on anything else drawn in the process.
    shuffles = torch.Generator().manual_seed(seed + 2)
    done = 0
    while done < steps:
        order = torch.randperm(N_TRAIN, generator=shuffles).to(x_train.device)
        for batch in order.split(PAPER_BATCH)[: steps - done]:
            optimizer.zero_grad()
            paper_loss(model, x_train[batch], y_train[batch]).backward()
            optimizer.step()
            done += 1
    optimizer.zero_grad()
    model.eval()
