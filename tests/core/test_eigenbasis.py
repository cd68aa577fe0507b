"""The dense eigenbasis preconditioner P = Q diag(scales): the same estimates as the diagonal one when
Q = I, the exact volume of a rotated quadratic with the matching P, seeded directions, clear errors."""

import math

import pytest
import torch

from localvol_fast.core.preconditioners import MAX_DENSE_DIM, Eigenbasis, check_dense_size, log_det
from localvol_fast.engine.directions import DenseDirectionBatch
from localvol_fast.engine.estimator import estimate_volume
from localvol_fast.ops import get_backend

D = 20


def _rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def _quartic(anchor, curvature):
    """A non-quadratic cost (the radius search does real work), float64."""
    def fn(theta):
        x = theta.double() - anchor
        return 0.5 * (x * x * curvature).sum(1) + (x**4).sum(1)
    return fn


@pytest.mark.filterwarnings("ignore:local volume. of 40 directions")  # box-clipped rays, on purpose
@pytest.mark.parametrize("measure", ["gaussian", "uniform-box"])
def test_identity_basis_gives_the_diagonal_estimates(measure):
    gen = torch.Generator().manual_seed(0)
    anchor = 0.3 * torch.randn(D, dtype=torch.float64, generator=gen)
    scales = torch.rand(D, dtype=torch.float64, generator=gen) + 0.2
    fn = _quartic(anchor, torch.rand(D, dtype=torch.float64, generator=gen) * 5 + 0.1)
    kwargs = dict(cutoff=1e-2, n_samples=40, seed=3, rtol=1e-6, backend="reference", batch_size=16)
    if measure == "gaussian":
        kwargs.update(measure="gaussian", sigma=0.7)
    else:
        kwargs.update(measure="uniform", bounds=anchor.abs() + 0.05)  # some rays leave the box first
    diagonal = estimate_volume(fn, anchor, preconditioner=scales, **kwargs)
    dense = estimate_volume(fn, anchor, preconditioner=Eigenbasis(torch.eye(D, dtype=torch.float64), scales), **kwargs)
    torch.testing.assert_close(dense.estimates, diagonal.estimates, rtol=1e-10, atol=0)
    torch.testing.assert_close(dense.radii, diagonal.radii, rtol=1e-10, atol=0)
    assert dense.log_volume == pytest.approx(diagonal.log_volume, rel=1e-10)


def test_rotated_quadratic_is_exact_with_the_matching_eigenbasis():
    eps, q = 1e-2, _rotation(D, 1)
    lam = torch.logspace(-2, 2, D, dtype=torch.float64)
    hessian = q @ torch.diag(lam) @ q.T  # non-diagonal: the diagonal preconditioners cannot match it
    anchor = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def fn(theta):
        x = theta.double() - anchor
        return 0.5 * ((x @ hessian) * x).sum(1)

    log_vd = D / 2 * math.log(math.pi) - math.lgamma(D / 2 + 1)
    truth = log_vd + D / 2 * math.log(2 * eps) - 0.5 * float(torch.log(lam).sum())
    result = estimate_volume(
        fn, anchor, cutoff=eps, n_samples=64, measure="uniform", preconditioner=Eigenbasis(q, lam**-0.5), rtol=1e-6
    )
    relative = ((result.estimates - truth) / abs(truth)).abs()
    assert float(relative.max()) < 1e-8  # measured: ~1e-14
    isotropic = estimate_volume(fn, anchor, cutoff=eps, n_samples=64, measure="uniform", rtol=1e-6)
    assert isotropic.log_volume < truth - 1.0  # the rotation matters: without P the rays are far off


def test_directions_are_a_function_of_seed_and_index():
    anchor = torch.zeros(D, dtype=torch.float64)
    basis = Eigenbasis(_rotation(D, 4), torch.rand(D, dtype=torch.float64) + 0.5).normalized()
    ops = get_backend("reference")
    whole = DenseDirectionBatch(ops, 7, torch.arange(10), anchor, basis, None, None)
    part = DenseDirectionBatch(ops, 7, torch.tensor([3, 8]), anchor, basis, None, None)
    torch.testing.assert_close(part.unit_vectors(torch.float64), whole.unit_vectors(torch.float64)[[3, 8]], rtol=0, atol=0)
    fn = _quartic(anchor, torch.ones(D, dtype=torch.float64))
    runs = [
        estimate_volume(fn, anchor, cutoff=1e-2, n_samples=12, sigma=1.0, preconditioner=basis, batch_size=b, seed=5)
        for b in (1, 5, 12)
    ]
    for run in runs[1:]:
        torch.testing.assert_close(run.estimates, runs[0].estimates, rtol=0, atol=0)


def test_log_det_and_normalization():
    scales = torch.rand(D, dtype=torch.float64) + 0.5
    basis = Eigenbasis(_rotation(D, 5), scales)
    assert log_det(basis) == pytest.approx(float(scales.log().sum()), rel=1e-12)
    assert abs(basis.normalized().log_det()) < 1e-12
    torch.testing.assert_close(basis.apply(torch.eye(D)), (basis.vectors * scales).T, rtol=1e-14, atol=1e-15)


def test_clear_errors():
    q = _rotation(D, 6)
    with pytest.raises(ValueError, match="orthonormal columns"):
        Eigenbasis(q * 1.01, torch.ones(D))
    with pytest.raises(ValueError, match="finite and positive"):
        Eigenbasis(q, torch.cat([torch.ones(D - 1), torch.zeros(1)]))
    with pytest.raises(ValueError, match="square"):
        Eigenbasis(q[:, :5], torch.ones(5))
    big = MAX_DENSE_DIM + 1
    with pytest.raises(ValueError, match=f"D = {big:,}.*GiB.*D <= {MAX_DENSE_DIM:,}"):
        Eigenbasis(torch.zeros(1).expand(big, big), torch.ones(big))  # refused before any D x D work
    with pytest.raises(ValueError, match="GiB"):
        check_dense_size(10**6)
    with pytest.raises(ValueError, match="D = 20 parameters but D = 21"):
        estimate_volume(lambda t: (t * t).sum(1), torch.zeros(D + 1), cutoff=1e-2, n_samples=2, sigma=1.0,
                        preconditioner=Eigenbasis(q, torch.ones(D)))


def test_journal_refuses_another_eigenbasis(tmp_path):
    anchor = torch.zeros(D, dtype=torch.float64)
    fn, path = _quartic(anchor, torch.ones(D, dtype=torch.float64)), tmp_path / "run.jsonl"
    first = Eigenbasis(_rotation(D, 7), torch.ones(D))
    run = dict(cutoff=1e-2, n_samples=8, sigma=1.0, output=path)
    done = estimate_volume(fn, anchor, preconditioner=first, **run)
    again = estimate_volume(fn, anchor, preconditioner=first, resume=True, **run)
    torch.testing.assert_close(again.estimates, done.estimates, rtol=0, atol=0)
    with pytest.raises(ValueError):
        estimate_volume(fn, anchor, preconditioner=Eigenbasis(_rotation(D, 8), torch.ones(D)), resume=True, **run)
