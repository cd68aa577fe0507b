"""HesScale (``nn.hesscale``) against the exact diagonal of the mean KL's Hessian on small MLPs."""

import itertools

import pytest
import torch
from torch.func import functional_call

from localvol_fast.nn.data import prepare_batches
from localvol_fast.nn.hesscale import hesscale_diagonal
from localvol_fast.nn.parameters import ParameterLayout, select_parameters


def _mlp(sizes, activation, seed=0):
    torch.manual_seed(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if k < len(sizes) - 2:
            layers.append(activation())
    return torch.nn.Sequential(*layers).double().eval()


def exact_kl_hessian_diagonal(model, x):
    """diag of the Hessian of mean_x KL(anchor || theta) at theta = anchor, by autograd (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    anchor_logp = torch.log_softmax(model(x), -1).detach()

    def kl(theta):
        pieces, start = {}, 0
        for n, s in zip(names, shapes):
            pieces[n] = theta[start : start + s.numel()].reshape(s)
            start += s.numel()
        logp = torch.log_softmax(functional_call(model, pieces, (x,)), -1)
        return (anchor_logp.exp() * (anchor_logp - logp)).sum(-1).mean()

    return torch.diagonal(torch.autograd.functional.hessian(kl, theta0))


def per_parameter_relative_errors(model, x, batch_rows=None):
    layout = ParameterLayout(select_parameters(model))
    batches, _ = prepare_batches(x, "cpu", batch_rows)
    approx = hesscale_diagonal(model, layout, batches)
    exact = exact_kl_hessian_diagonal(model, x)
    return {
        name: float((approx[lo:hi] - exact[lo:hi]).norm() / exact[lo:hi].norm())
        for name, (_, lo, hi) in zip(layout.names, layout.spans())
    }


@pytest.mark.parametrize("activation", [torch.nn.Tanh, lambda: torch.nn.GELU(approximate="tanh"), torch.nn.ReLU])
def test_last_layer_is_exact_and_the_rest_close(activation):
    model = _mlp([6, 5, 4], activation)
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = per_parameter_relative_errors(model, x, batch_rows=16)  # 3 batches: the mean over all rows
    assert errors["2.weight"] < 1e-10 and errors["2.bias"] < 1e-10  # exact: the logits are linear in them
    # The first layer loses the off-diagonal parts of diag(p) - p p^T: measured 0.2-0.4 relative here.
    assert errors["0.weight"] < 0.6 and errors["0.bias"] < 0.6


def test_deeper_mlp_agreement():
    model = _mlp([5, 6, 6, 3], torch.nn.Tanh, seed=3)
    x = torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    errors = per_parameter_relative_errors(model, x)
    assert errors["4.weight"] < 1e-10 and errors["4.bias"] < 1e-10
    assert max(errors.values()) < 0.8


def test_diagonal_is_nonnegative_and_follows_the_layout():
    model = _mlp([4, 3, 2], torch.nn.Tanh)
    x = torch.randn(10, 4, dtype=torch.float64)
    layout = ParameterLayout(select_parameters(model, ["2.weight"]))  # a subset: only its entries come back
    batches, _ = prepare_batches(x, "cpu")
    diagonal = hesscale_diagonal(model, layout, batches)
    full = hesscale_diagonal(model, ParameterLayout(select_parameters(model)), batches)
    assert diagonal.shape == (6,) and diagonal.dtype == torch.float64
    assert bool((diagonal >= 0).all())
    torch.testing.assert_close(diagonal, full[3 * 4 + 3 : 3 * 4 + 3 + 6])


def test_other_models_are_refused():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    batches, _ = prepare_batches(torch.randn(4, 3), "cpu")
    for model in (Net(), torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))):
        layout = ParameterLayout(select_parameters(model))
        with pytest.raises(ValueError, match="plain MLPs"):
            hesscale_diagonal(model, layout, batches)
