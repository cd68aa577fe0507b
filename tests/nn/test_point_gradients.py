"""``nn.costs.gradients.PointGradients``: the costs and gradients the sequential method's HMC moves use,
against the evaluators' own costs and central finite differences of them (float64 models)."""

import pytest
import torch

from localvol_fast.nn.costs.choice import make_cost
from localvol_fast.nn.costs.gradients import PointGradients
from localvol_fast.nn.data import prepare_batches
from localvol_fast.nn.neighborhoods import make_neighborhood
from localvol_fast.nn.parameters import ParameterLayout, select_parameters
from localvol_fast.ops import get_backend


class _Tanh(torch.nn.Module):  # not a plain MLP: the generic functional path
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) ** 2)


def _cost(model, data, evaluation, neighborhood="kl", loss_fn=None, l2_reg=0.0, data_batch_size=None):
    layout = ParameterLayout(select_parameters(model))
    batches, _ = prepare_batches(data, torch.device("cpu"), data_batch_size)
    return make_cost(evaluation, model, batches, make_neighborhood(neighborhood, loss_fn), layout,
                     get_backend("reference"), l2_reg=l2_reg)


def _points(cost, n=5, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return cost.anchor + scale * torch.randn(n, cost.dim, generator=g, dtype=cost.anchor.dtype)


def _central_differences(cost, theta, h):
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    return (cost.costs_of_points(theta + h * eye) - cost.costs_of_points(theta - h * eye)) / (2 * h)


@pytest.mark.parametrize("evaluation", ["vmap", "sequential", "inplace"])
@pytest.mark.parametrize("case", ["mlp-kl", "tanh-kl-two-batches", "mlp-loss-l2"])
def test_costs_and_gradients_match_the_evaluator_and_finite_differences(evaluation, case):
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    if case == "mlp-kl":
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
        cost = _cost(model, x, evaluation)
    elif case == "tanh-kl-two-batches":
        model = _Tanh().double()
        cost = _cost(model, x, evaluation, data_batch_size=5)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
        y = torch.randn(12, 3, dtype=torch.float64)
        cost = _cost(model, (x, y), evaluation, neighborhood="loss",
                     loss_fn=lambda out, t: ((out - t) ** 2).mean(), l2_reg=0.7)
    before = [p.detach().clone() for p in model.parameters()]
    thetas = _points(cost)
    costs, grads = PointGradients(cost)(thetas)
    assert costs.dtype == grads.dtype == torch.float64 and grads.shape == thetas.shape
    torch.testing.assert_close(costs, cost.costs_of_points(thetas), rtol=1e-10, atol=1e-12)
    # the KL is summed in float32 (the reference kernel), the loss in float64: steps and tolerances to match
    h, tolerance = (1e-5, dict(rtol=1e-6, atol=1e-9)) if case.startswith("mlp-loss") else (1e-3, dict(rtol=1e-3, atol=5e-5))
    for j in range(2):
        torch.testing.assert_close(grads[j], _central_differences(cost, thetas[j], h), **tolerance)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # functional: the model's own weights are never written


def test_a_model_vmap_cannot_batch_is_differentiated_one_probe_at_a_time():
    class Itemized(torch.nn.Module):  # .item() inside forward: vmap refuses it
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            scale = 1.0 + 0.0 * float(self.lin.weight.sum().item())
            return self.lin(x) * scale

    model = Itemized().double()
    cost = _cost(model, torch.randn(6, 3, dtype=torch.float64), "sequential")
    evaluator = PointGradients(cost)
    thetas = _points(cost, n=3)
    costs, grads = evaluator(thetas)
    assert not evaluator.use_vmap and evaluator.fallback_reason
    torch.testing.assert_close(costs, cost.costs_of_points(thetas), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], _central_differences(cost, thetas[0], 1e-3), rtol=1e-3, atol=5e-5)
