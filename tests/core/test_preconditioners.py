"""Importance weights: the Adam preconditioner from every source, normalization, clear errors."""

import pytest
import torch

from localvol_fast.core.preconditioners import log_det, normalize_preconditioner
from localvol_fast.nn.preconditioners import adam_preconditioner


def _trained_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def test_adam_from_instance_state_dict_and_tensor_agree():
    model, opt = _trained_adam()
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    from_instance = adam_preconditioner(opt)
    from_state = adam_preconditioner(opt.state_dict(), params=list(model.parameters()))
    from_tensor = adam_preconditioner(v)
    assert from_instance.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(from_instance, from_state, rtol=0, atol=0)
    torch.testing.assert_close(from_instance, from_tensor, rtol=0, atol=0)
    raw = 1.0 / (v.double().sqrt() + 1e-5)
    torch.testing.assert_close(from_tensor.double(), raw / raw.log().mean().exp(), rtol=1e-6, atol=0)
    assert abs(log_det(from_instance)) < 1e-3  # det P = 1 up to float32 rounding


def test_first_moment_exponent_and_eps():
    model, opt = _trained_adam()
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()]).double().abs()
    p1 = adam_preconditioner(opt, moment=1, exponent=1.0, eps=1e-3).double()
    raw = 1.0 / (m + 1e-3)
    torch.testing.assert_close(p1, raw / raw.log().mean().exp(), rtol=1e-6, atol=0)


def test_parameter_subset_order():
    model, opt = _trained_adam()
    last = list(model.parameters())[-2:]
    sub = adam_preconditioner(opt, params=last)
    assert sub.numel() == sum(p.numel() for p in last)


def test_normalize_any_diagonal():
    d = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    n = normalize_preconditioner(d)
    assert abs(float(n.log().sum())) < 1e-12
    torch.testing.assert_close(n / n[0], d / d[0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([1.0, 0.0]), "element 1"),
        (torch.tensor([1.0, -2.0]), "element 1"),
        (torch.tensor([float("nan"), 1.0]), "element 0"),
        (torch.tensor([]), "empty"),
    ],
)
def test_bad_diagonals(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_preconditioner(bad)


def test_adam_errors_are_clear():
    model = torch.nn.Linear(2, 2)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="no state"):
        adam_preconditioner(fresh)
    _, opt = _trained_adam()
    with pytest.raises(ValueError, match="no state"):
        adam_preconditioner(opt, params=list(model.parameters()))
    with pytest.raises(ValueError, match="other parameters"):
        adam_preconditioner(opt.state_dict(), params=list(model.parameters()))
    with pytest.raises(TypeError, match="Adam"):
        adam_preconditioner("adam")
    with pytest.raises(ValueError, match="moment"):
        adam_preconditioner(torch.ones(3), moment=3)
