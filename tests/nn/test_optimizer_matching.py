"""Optimizer state matched by identity, not by shape (issue 14, "Reliability", part 3).

A live optimizer is matched to the parameters by identity. A ``state_dict`` numbers the parameters of
its param groups in the order the optimizer was built with: it is matched by the names its groups carry
(an optimizer built from ``model.named_parameters()``), or, for one unnamed group, as
``Adam(model.parameters())`` with every shape checked. Several unnamed groups (the user's report: the
layers listed in another order, all of the same shapes, silently got each other's moments) are refused.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import Wrapped, assert_restored, snapshot

from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.preconditioners import adam_preconditioner, selected_optimizer_state

QUIET = {"progress": False}
PATHS = ["mlp", "vmap", "sequential", "inplace"]


def inputs() -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(0))


def same_shaped_layers() -> torch.nn.Sequential:
    """Two hidden layers of one shape: moments matched by shape alone cannot tell them apart."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    )


def trained(groups):
    """The model after two Adam steps with param groups ``groups(model)``; the grads are cleared."""
    model = same_shaped_layers()
    optimizer = torch.optim.Adam(groups(model), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        (model(inputs()) * torch.arange(3.0)).sum().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, optimizer


def reordered_groups(model):
    """The user's case: the layers listed in another order than model.parameters()."""
    return [{"params": model[2].parameters()}, {"params": model[0].parameters()}, {"params": model[4].parameters()}]


def named_reordered_groups(model):
    named = dict(model.named_parameters())
    order = ["2.weight", "2.bias", "0.weight", "0.bias", "4.weight", "4.bias"]
    return [{"params": [(n, named[n]) for n in order[:2]]}, {"params": [(n, named[n]) for n in order[2:]]}]


def on_path(model, path):
    return (model, "vmap") if path == "mlp" else (Wrapped(model), path)


def run(model, evaluation, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(model, inputs(), n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET, **kw)


def moments_in_model_order(model, optimizer) -> torch.Tensor:
    return torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("path", PATHS)
def test_unnamed_param_groups_in_another_order_are_refused_as_a_state_dict(path):
    model, optimizer = trained(reordered_groups)
    runner, evaluation = on_path(model, path)
    snap = snapshot(runner)
    with pytest.raises(ValueError, match=r"(?s)3 param groups that do not name their parameters.*live optimizer"):
        run(runner, evaluation, preconditioner="adam", optimizer=optimizer.state_dict())
    assert_restored(runner, snap)


@pytest.mark.parametrize("path", PATHS)
def test_the_live_optimizer_with_reordered_groups_uses_each_parameters_own_moments(path):
    model, optimizer = trained(reordered_groups)
    runner, evaluation = on_path(model, path)
    snap = snapshot(runner)
    live = run(runner, evaluation, preconditioner="adam", optimizer=optimizer)
    assert_restored(runner, snap)
    by_hand = adam_preconditioner(moments_in_model_order(model, optimizer))
    assert torch.equal(live.estimates, run(runner, evaluation, preconditioner=by_hand).estimates)
    # What the shape-only matching computed: the two hidden layers' moments swapped. It differs.
    groups_order = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for g in optimizer.param_groups
                              for p in g["params"]])
    swapped = run(runner, evaluation, preconditioner=adam_preconditioner(groups_order))
    assert not torch.equal(live.estimates, swapped.estimates)


@pytest.mark.parametrize("path", PATHS)
def test_a_state_dict_with_named_groups_in_another_order_is_matched_by_name(path):
    model, optimizer = trained(named_reordered_groups)
    runner, evaluation = on_path(model, path)
    if path != "mlp":  # the optimizer named the parameters of the bare Sequential
        with pytest.raises(ValueError, match=r"names no parameter 'inner\.0\.weight'"):
            run(runner, evaluation, preconditioner="adam", optimizer=optimizer.state_dict())
        return
    snap = snapshot(runner)
    from_state = run(runner, evaluation, preconditioner="adam", optimizer=optimizer.state_dict())
    live = run(runner, evaluation, preconditioner="adam", optimizer=optimizer)
    assert_restored(runner, snap)
    assert torch.equal(from_state.estimates, live.estimates)


def test_selected_state_holds_each_parameters_own_moments():
    model, optimizer = trained(named_reordered_groups)
    named = list(model.named_parameters())
    selected = selected_optimizer_state(optimizer.state_dict(), model, named)
    for (name, p), sid in zip(named, selected["param_groups"][0]["params"]):
        assert torch.equal(selected["state"][sid]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"]), name
    subset = selected_optimizer_state(optimizer.state_dict(), model, named[2:4])
    assert [tuple(subset["state"][i]["exp_avg_sq"].shape) for i in subset["param_groups"][0]["params"]] == [(4, 4), (4,)]


def test_one_unnamed_group_is_taken_in_model_order_and_its_shapes_are_checked():
    model, optimizer = trained(lambda m: m.parameters())
    named = list(model.named_parameters())
    selected = selected_optimizer_state(optimizer.state_dict(), model, named)
    for (name, p), sid in zip(named, selected["param_groups"][0]["params"]):
        assert torch.equal(selected["state"][sid]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"]), name
    # One group listing the layers in another order: the shapes tell (here: the last layer's (3, 4)).
    permuted, permuted_opt = trained(lambda m: [*m[4].parameters(), *m[0].parameters(), *m[2].parameters()])
    with pytest.raises(ValueError, match=r"optimizer state for '0\.weight' has shape \(3, 4\) but the parameter has \(4, 4\)"):
        run(permuted, "vmap", preconditioner="adam", optimizer=permuted_opt.state_dict())


def test_adam_preconditioner_checks_each_shape_of_a_state_dict_against_the_given_order():
    model, optimizer = trained(lambda m: m.parameters())
    params = list(model.parameters())
    state = optimizer.state_dict()
    assert torch.equal(adam_preconditioner(state, params=params), adam_preconditioner(optimizer))
    # Same total size, another order: the old total-size check let this through.
    reordered = [params[4], params[5], *params[:4]]
    with pytest.raises(ValueError, match=r"parameter id 0 has shape \(4, 4\) but parameter 0 has \(3, 4\).*another order"):
        adam_preconditioner(state, params=reordered)
    with pytest.raises(ValueError, match=r"holds 6 parameters but 4 were given"):
        adam_preconditioner(state, params=params[:4])
    broken = copy.deepcopy(state)
    broken["state"][2]["exp_avg_sq"] = broken["state"][2]["exp_avg_sq"].t().contiguous().reshape(2, 8)
    with pytest.raises(ValueError, match=r"parameter id 2 has shape \(2, 8\) but parameter 2 has \(4, 4\)"):
        adam_preconditioner(broken, params=params)


def test_a_live_optimizer_with_a_moment_of_the_wrong_shape_is_still_refused():
    model, optimizer = trained(reordered_groups)
    optimizer.state[model[2].weight]["exp_avg_sq"] = torch.ones(16)
    with pytest.raises(ValueError, match=r"exp_avg_sq for parameter 2 has shape \(16,\) but the parameter has \(4, 4\)"):
        run(model, "vmap", preconditioner="adam", optimizer=optimizer)
