"""The exact output Fisher (the KL's Hessian at the anchor) against explicit Jacobians, and the
"diag-h" / "hessian-eigen" preconditioners and ``Eigenbasis`` objects through ``estimate``."""

import pytest
import torch
from torch.func import functional_call

import localvol_fast as lv
from localvol_fast.core.preconditioners import Eigenbasis
from localvol_fast.nn.curvature import fisher_eigenbasis, output_fisher_diagonal, output_fisher_matrix
from localvol_fast.nn.data import Batch
from localvol_fast.nn.parameters import ParameterLayout, select_parameters
from localvol_fast.nn.preconditioners import PRECONDITIONER_NAMES


def _tiny(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3)).to(dtype).eval()
    return model, torch.randn(9, 5, dtype=dtype), ParameterLayout(select_parameters(model, None))


def _brute_force_fisher(model, layout, x):
    """(1/N) sum_x J^T (diag p - p p^T) J with J the explicit (N, C, D) Jacobian of the logits."""
    theta = layout.flatten()
    logits = lambda t: functional_call(model, layout.split(t), (x,))  # noqa: E731
    jac = torch.autograd.functional.jacobian(logits, theta)
    p = torch.softmax(logits(theta), -1)
    blocks = [jac[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ jac[i] for i in range(x.shape[0])]
    return torch.stack(blocks).mean(0)


def test_exact_fisher_against_explicit_jacobians():
    model, x, layout = _tiny()
    truth = _brute_force_fisher(model, layout, x)
    matrix, diagonal = output_fisher_matrix(model, layout, x), output_fisher_diagonal(model, layout, x)
    scale = float(truth.abs().max())
    assert float((matrix - truth).abs().max()) < 1e-10 * scale  # measured ~2e-16
    assert float((diagonal - truth.diagonal()).abs().max()) < 1e-10 * scale
    torch.testing.assert_close(diagonal, matrix.diagonal(), rtol=1e-12, atol=0)
    batches = [Batch((x[:4],), {}), Batch((x[4:],), {})]  # the mean over examples, whatever the batching
    torch.testing.assert_close(output_fisher_diagonal(model, layout, batches), diagonal, rtol=1e-12, atol=0)


def test_fisher_eigenbasis_is_the_paper_scaling():
    model, x, layout = _tiny()
    matrix = output_fisher_matrix(model, layout, x)
    basis = fisher_eigenbasis(model, layout, x, eps=1e-3)
    lam = basis.vectors.T @ matrix @ basis.vectors  # diagonal in its own eigenbasis
    assert float((lam - torch.diag(lam.diagonal())).abs().max()) < 1e-12 * float(matrix.abs().max())
    # 1/scales - eps = lambda^0.5; zero eigenvalues come out as rounding (~1e-17), whose root is ~1e-8
    torch.testing.assert_close(1.0 / basis.scales - 1e-3, lam.diagonal().abs().sqrt(), rtol=1e-8, atol=1e-7)


def test_refuses_non_classifier_batches():
    model, x, layout = _tiny()
    with pytest.raises(ValueError, match="one input tensor"):
        output_fisher_diagonal(model, layout, [Batch((x,), {}, mask=torch.ones(9, 1))])


@pytest.mark.parametrize("name", ["diag-h", "hessian-eigen"])
def test_estimate_with_exact_curvature_on_every_evaluator(name):
    assert name in PRECONDITIONER_NAMES
    model, x, _ = _tiny(torch.float32)
    runs = {
        evaluation: lv.estimate(model, x, preconditioner=name, preconditioner_eps=1e-3, n_samples=12, progress=False,
                                evaluation=evaluation, sigma=1.0)
        for evaluation in ("vmap", "sequential", "inplace")
    }
    for evaluation, run in runs.items():
        assert run.info["preconditioner"]["name"] == name
        torch.testing.assert_close(run.estimates, runs["vmap"].estimates, rtol=1e-4, atol=1e-3, msg=evaluation)


def test_identity_eigenbasis_through_estimate_matches_the_diagonal():
    model, x, layout = _tiny(torch.float32)
    scales = torch.rand(layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    basis = Eigenbasis(torch.eye(layout.dim, dtype=torch.float64), scales)
    run = dict(n_samples=12, progress=False, sigma=1.0, backend="reference")
    for evaluation in ("vmap", "sequential", "inplace"):  # vmap: the plain MLP's factored path
        dense = lv.estimate(model, x, preconditioner=basis, evaluation=evaluation, **run)
        diagonal = lv.estimate(model, x, preconditioner=scales, evaluation=evaluation, **run)
        torch.testing.assert_close(dense.estimates, diagonal.estimates, rtol=1e-10, atol=0, msg=evaluation)


def test_estimate_refuses_an_eigenbasis_of_another_size():
    model, x, layout = _tiny(torch.float32)
    basis = Eigenbasis(torch.eye(layout.dim + 1, dtype=torch.float64), torch.ones(layout.dim + 1))
    with pytest.raises(ValueError, match=f"D = {layout.dim + 1} parameters but D = {layout.dim}"):
        lv.estimate(model, x, preconditioner=basis, n_samples=2, progress=False)
