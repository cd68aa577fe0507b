"""Output contracts of the neighborhoods (issue 14, "Reliability", part 2).

The KL neighborhood needs (N, classes) logits with at least 2 classes. A one-column classifier would
give KL 0 at every weight (every direction "unbounded"), and a 1-D output would be read as one softmax
over the batch: both are refused with the shape and what to do instead, on every evaluation path, and
the model comes back exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Wrapped, assert_restored, snapshot

from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.neighborhoods import check_class_logits

QUIET = {"progress": False}
PATHS = ["mlp", "vmap", "sequential", "inplace"]


def inputs(rows: int = 16) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(0))


def classifier(classes: int, path: str):
    torch.manual_seed(0)
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes))
    return (sequential, "vmap") if path == "mlp" else (Wrapped(sequential), path)


class Squeezed(torch.nn.Module):
    """A binary classifier returning one logit per example, shape (N,)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def run(model, evaluation, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(model, kw.pop("data", inputs()), n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_one_output_column_is_refused_for_kl(path):
    model, evaluation = classifier(1, path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)at least 2 classes.*shape \(16, 1\).*KL would be 0.*neighborhood='loss'"):
        run(model, evaluation)
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", ["vmap", "sequential", "inplace"])
def test_a_1d_output_is_refused_for_kl(evaluation):
    model = Squeezed()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)needs \(N, classes\) logits.*shape \(16,\).*neighborhood='loss'"):
        run(model, evaluation)
    assert_restored(model, snap)


@pytest.mark.parametrize("path", PATHS)
def test_one_output_column_works_with_the_loss_neighborhood(path):
    """What the error message recommends does work."""
    model, evaluation = classifier(1, path)
    y = (torch.arange(16) % 2).float().unsqueeze(1)
    snap = snapshot(model)
    result = run(model, evaluation, data=(inputs(), y), neighborhood="loss",
                 loss_fn=torch.nn.functional.binary_cross_entropy_with_logits)
    assert result.dim == 4 * 8 + 8 + 8 + 1 and "converged" in result.status
    assert_restored(model, snap)


@pytest.mark.parametrize("path", PATHS)
def test_two_classes_are_enough_for_kl(path):
    model, evaluation = classifier(2, path)
    result = run(model, evaluation)
    assert "converged" in result.status and bool(torch.isfinite(result.estimates).all())


@pytest.mark.parametrize(
    "shape, ok",
    [((5, 2), True), ((3, 7, 11), True), ((5, 1), False), ((3, 7, 1), False), ((5,), False), ((), False)],
)
def test_the_contract_by_shape(shape, ok):
    logits = torch.zeros(shape)
    if ok:
        check_class_logits(logits)
    else:
        with pytest.raises(ValueError, match=rf"shape {str(tuple(shape)).replace('(', '[(]').replace(')', '[)]')}"):
            check_class_logits(logits)
