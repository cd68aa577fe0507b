"""Factories for ``localvol estimate --factory tests.apps.cli_factory:NAME`` (used by tests/apps/test_cli.py)."""

import torch


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _inputs():
    return torch.randn(32, 4, generator=torch.Generator().manual_seed(1))


def build():
    """(model, data): a tiny classifier MLP and its evaluation inputs."""
    return _mlp(), _inputs()


def build_trained():
    """(model, (inputs, targets), extras): a few Adam steps, so the Adam preconditioner and loss work."""
    model, x = _mlp(), _inputs()
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, (x, y), {"optimizer": optimizer}


def not_a_model():
    return "not a model", torch.zeros(3)


def broken():
    raise RuntimeError("the factory failed on purpose")


NOT_CALLABLE = 3
