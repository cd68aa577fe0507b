"""localvol_fast.compat: tyche's names and conventions, computed with localvol_fast's machinery."""

import math
import warnings

import mpmath
import pytest
import torch

from localvol_fast import estimate_volume, gaussian_directions, log_ball_volume, log_mean_exp
from localvol_fast.compat import (
    VolumeResult,
    aggregate,
    diag_preconditioner,
    find_radius_vectorized,
    get_estimates_vectorized,
    get_estimates_vectorized_gauss,
    sample_directions,
)
from localvol_fast.compat.volume import GaussianTerms, estimate_along
from localvol_fast.core.preconditioners import log_det, normalize_preconditioner


def _quadratic(h, offset=0.0):
    """fn(center, vec) = offset + vec^T diag(h) vec / 2 (tyche's binary convention; vec may be the int 0)."""

    def fn(center, vec):
        d = torch.as_tensor(vec).double()
        return offset + 0.5 * (d * d * h).sum()

    return fn


def _star(h):
    """A non-quadratic cost increasing along every ray: q + q^2 + a direction-dependent factor."""

    def fn(center, vec):
        d = torch.as_tensor(vec).double() * torch.ones_like(h)
        q = 0.5 * (d * d * h).sum()
        rho = torch.sqrt((d * d).sum()).clamp_min(1e-300)
        return q * (1.2 + 0.5 * torch.cos(3 * d[0] / rho)) + q * q

    return fn


def _log_gammainc_lower(s, x):
    """log of the regularized lower incomplete gamma P(s, x)."""
    return float(mpmath.log(mpmath.gammainc(s, 0, x, regularized=True)))


# ----- directions --------------------------------------------------------------------------------------
def test_same_seed_gives_tyches_directions_per_batch():
    D, n, bs, seed = 12, 7, 3, 123
    spec = torch.linspace(0.01, 4.0, D)  # float32, like Adam's exp_avg_sq
    pre = diag_preconditioner(spec, eps=1e-5)
    torch.manual_seed(seed)  # tyche: one seed, then one randn(batch_size, D) per batch (the last one full size)
    raw = torch.cat([torch.randn(bs, D) for _ in range(3)])[:n]
    expected = pre(raw / torch.norm(raw, dim=1, keepdim=True))
    got = sample_directions(n, D, seed=seed, batch_size=bs, preconditioner=pre)
    assert got.dtype == torch.float64 and got.shape == (n, D)
    torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-7)

    seen = []
    fn = _quadratic(torch.ones(D, dtype=torch.float64))

    def recording_fn(center, vec):
        if isinstance(vec, torch.Tensor):
            seen.append(vec.double() / vec.double().norm())
        return fn(center, vec)

    res = get_estimates_vectorized_gauss(
        n, 1.0, batch_size=bs, preconditioner=pre, fn=recording_fn, params=torch.zeros(D), seed=seed, with_tqdm=False
    )
    assert res.estimates.shape == (n,)  # exactly n, though the last batch was drawn at full size
    torch.testing.assert_close(res.props, expected.double().norm(dim=1), rtol=1e-6, atol=0)
    unit = expected.double() / expected.double().norm(dim=1, keepdim=True)
    cosines = torch.stack(seen) @ unit.T  # every perturbation lies along one of the directions, all are used
    assert torch.allclose(cosines.max(dim=1).values, torch.ones(len(seen), dtype=torch.float64), atol=1e-6)
    assert set(cosines.argmax(dim=1).tolist()) == set(range(n))


def test_callable_and_matrix_preconditioners_see_tyches_vectors():
    D, n, seed = 6, 5, 7
    p = torch.linspace(0.5, 2.0, D)
    torch.manual_seed(seed)
    raw = torch.randn(n, D)
    unit = raw / torch.norm(raw, dim=1, keepdim=True)
    # a plain callable receives tyche's float32 unit vectors and its output is used as is
    got = sample_directions(n, D, seed=seed, preconditioner=lambda x: x * p)
    torch.testing.assert_close(got, (unit * p).double(), rtol=0, atol=0)
    # a (D, D) matrix is applied as vecs @ P.T, as tyche's get_estimates_vectorized does
    P = torch.diag(p) + 0.1 * torch.ones(D, D)
    fn = _quadratic(torch.ones(D, dtype=torch.float64))
    est, props, mults, deltas = get_estimates_vectorized(n, P, fn=fn, params=torch.zeros(D), seed=seed)
    torch.testing.assert_close(props, (unit @ P.T).double().norm(dim=1), rtol=1e-6, atol=0)


# ----- closed forms on quadratic costs with the exact preconditioner ---------------------------------------
def test_uniform_ellipsoid_is_exact_per_direction():
    D, eps = 30, 1e-3
    h = torch.logspace(-2, 2, D, dtype=torch.float64)
    truth = log_ball_volume(D) + 0.5 * float(torch.log(2 * eps / h).sum())
    fn = _quadratic(h, offset=3.0)  # fn(center, 0) = 3 is subtracted
    for pre in (diag_preconditioner(h, eps=0.0, exponent=0.5), torch.diag(h**-0.5), 7.0 * h**-0.5):
        est, props, mults, deltas = get_estimates_vectorized(16, pre, fn=fn, params=torch.randn(D, dtype=torch.float64), cutoff=eps)
        assert torch.allclose(est, torch.full_like(est, truth), rtol=1e-10, atol=0), (est, truth)
    iso, *_ = get_estimates_vectorized(16, fn=fn, params=torch.randn(D, dtype=torch.float64), cutoff=eps)
    assert (iso < truth).all()  # isotropic directions underestimate (Jensen)


def test_gaussian_isotropic_ball_is_exact_per_direction():
    D, eps, sigma, h = 40, 1e-2, 0.5, 0.02  # P(chi2_D <= 2 eps / (h sigma^2)) = P(D/2, eps / (h sigma^2))
    truth = _log_gammainc_lower(D / 2, eps / (h * sigma**2))
    res = get_estimates_vectorized_gauss(
        12, sigma, fn=_quadratic(torch.full((D,), h, dtype=torch.float64)), params=torch.zeros(D, dtype=torch.float64),
        cutoff=eps, with_tqdm=False,
    )
    assert isinstance(res, VolumeResult) and res.status == ["converged"] * 12
    assert torch.allclose(res.estimates, torch.full_like(res.estimates, truth), rtol=1e-10, atol=1e-10), truth
    assert abs(float(aggregate(res.estimates)) - truth) < 1e-9


def test_gaussian_ellipsoid_with_matching_sigma_and_exact_preconditioner():
    # sigma_i = s0 / sqrt(h_i) and P = H^(-1/2): every direction gives P(s0^2 chi2_D <= 2 eps) exactly.
    D, eps, s0 = 25, 1e-2, 0.05
    h = torch.logspace(-1, 2, D, dtype=torch.float64)
    truth = _log_gammainc_lower(D / 2, eps / s0**2)
    res = get_estimates_vectorized_gauss(
        10, s0 / h.sqrt(), preconditioner=diag_preconditioner(h, eps=0.0), fn=_quadratic(h),
        params=torch.zeros(D, dtype=torch.float64), cutoff=eps, with_tqdm=False,
    )
    assert torch.allclose(res.estimates, torch.full_like(res.estimates, truth), rtol=1e-10, atol=1e-10), truth


# ----- the search ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rtol", [1e-1, 1e-2, 1e-4])
def test_find_radius_hits_the_cutoff_on_a_toy_cost(rtol):
    D, cutoff = 9, 1e-3
    gen = torch.Generator().manual_seed(0)
    vecs = torch.randn(6, D, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, 6, dtype=torch.float64).reshape(-1, 1)
    fn = lambda center, v: 2.0 + (torch.as_tensor(v) ** 2).sum() + (torch.as_tensor(v) ** 4).sum() * 1e3  # noqa: E731
    mults, deltas = find_radius_vectorized(torch.zeros(D), vecs, cutoff, fn, rtol=rtol)
    assert mults.shape == deltas.shape == (6,) and mults.dtype == torch.float64
    assert ((deltas - cutoff).abs() <= rtol * cutoff).all()
    at_radius = torch.stack([fn(None, m * v.double()) - 2.0 for m, v in zip(mults, vecs)]).double()
    assert ((at_radius - cutoff).abs() <= rtol * cutoff).all()
    # mults are in units of each vector's length; a list of vectors works the same
    mults2, _ = find_radius_vectorized(torch.zeros(D), list(2 * vecs), cutoff, fn, rtol=rtol)
    torch.testing.assert_close(mults2, mults / 2, rtol=rtol, atol=0)


def test_find_radius_passes_vecs_dtype_and_warns_when_out_of_iterations():
    seen = []

    def fn(center, v):
        if isinstance(v, torch.Tensor):
            seen.append(v.dtype)
        return (torch.as_tensor(v).double() ** 2).sum()

    mults, _ = find_radius_vectorized(torch.zeros(3), torch.ones(2, 3), 1e-2, fn, rtol=1e-3, iters=10)
    assert set(seen) == {torch.float32}
    torch.testing.assert_close(mults, torch.full((2,), math.sqrt(1e-2 / 3), dtype=torch.float64), rtol=1e-6, atol=0)  # float32 steps
    with pytest.warns(RuntimeWarning, match="not_converged"):
        find_radius_vectorized(torch.zeros(3), torch.ones(2, 3) * 1e-6, 1e-2, fn, rtol=1e-3, iters=0)


def test_mults_deltas_gaussint_and_estimates_mean_what_tyche_says():
    D, sigma, cutoff, rtol = 3, 0.7, 0.05, 1e-2
    h = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    center = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    fn = _star(h)
    res = get_estimates_vectorized_gauss(
        6, sigma, fn=fn, params=center, cutoff=cutoff, rtol=rtol, batch_size=4, seed=3, with_tqdm=False,
        preconditioner=diag_preconditioner(torch.tensor([1.0, 2.0, 0.1])),
    )
    vecs = sample_directions(6, D, seed=3, batch_size=4, preconditioner=diag_preconditioner(torch.tensor([1.0, 2.0, 0.1])))
    torch.testing.assert_close(res.props, vecs.norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(res.radii, res.mults * res.props)
    assert ((res.deltas - cutoff).abs() <= rtol * cutoff).all()
    at_radius = torch.stack([fn(center, m * v) - fn(center, 0) for m, v in zip(res.mults, vecs)])
    assert ((at_radius - cutoff).abs() <= 1e-3 * cutoff).all()  # the radius is interpolated onto the cutoff
    for k in range(6):  # tyche's a, b, c, n and x1 = mults * props, integrated by mpmath
        a = 1 / sigma**2
        b = float(-(vecs[k] @ center) / (sigma**2 * res.props[k]))
        c = float(-(center @ center) / (2 * sigma**2))
        x1 = float(res.mults[k] * res.props[k])
        integral = mpmath.quad(lambda t: t ** (D - 1) * mpmath.exp(-a * t**2 / 2 + b * t + c), [0, x1])
        assert abs(float(mpmath.log(integral)) - float(res.gaussint[k])) < 1e-10
    logconst = log_ball_volume(D) + math.log(D) - (D / 2) * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(res.estimates, res.gaussint + logconst - D * torch.log(res.props), rtol=1e-13, atol=1e-12)


def test_unbounded_rays():
    D = 20
    flat = lambda center, v: torch.tensor(0.0)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="unbounded"):
        res = get_estimates_vectorized_gauss(4, 0.3, fn=flat, params=torch.zeros(D), with_tqdm=False)
    assert torch.isinf(res.mults).all() and (res.estimates.abs() < 1e-10).all()  # each ray holds its share
    with pytest.warns(RuntimeWarning, match="infinite volume"):
        est, _, mults, _ = get_estimates_vectorized(3, fn=flat, params=torch.ones(D))
    assert torch.isinf(mults).all() and (est == math.inf).all()


# ----- aggregate, arguments, preconditioner ----------------------------------------------------------------
def test_aggregate_is_log_mean_exp():
    x = torch.tensor([-1e8, -1e8 + 3.0, -1e8 - 50.0], dtype=torch.float64)
    assert abs(float(aggregate(x)) - log_mean_exp(x)) < 1e-6
    assert aggregate(x).dim() == 0 and aggregate(x).dtype == torch.float64
    m = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(aggregate(m), torch.logsumexp(m, 1) - math.log(5))  # divides by the size along dim
    torch.testing.assert_close(aggregate(m, dim=0), torch.logsumexp(m, 0) - math.log(3))
    assert aggregate(m, keepdim=True).shape == (3, 1)
    assert float(aggregate([0.0, math.log(3.0)])) == pytest.approx(math.log(2.0))
    value, sign = aggregate(torch.full((4,), -math.inf), return_sign=True)
    assert value == -math.inf and sign == 0
    with pytest.raises(ValueError, match="no estimates"):
        aggregate(torch.empty(0))


def test_tol_y_tol_and_gaussint_fn_are_accepted_and_ignored():
    D = 15
    args = dict(fn=_star(torch.ones(D, dtype=torch.float64)), params=torch.full((D,), 0.1), cutoff=1e-2, with_tqdm=False)
    base = get_estimates_vectorized_gauss(5, 0.2, **args)
    for extra in ({"tol": 1e-9, "y_tol": 1e-9}, {"tol": 1e3, "y_tol": 1e3, "gaussint_fn": None, "debug": False}):
        other = get_estimates_vectorized_gauss(5, 0.2, **extra, **args)
        assert torch.equal(other.estimates, base.estimates) and torch.equal(other.gaussint, base.gaussint)
    with pytest.raises(TypeError):
        get_estimates_vectorized_gauss(5, 0.2, not_an_option=1, **args)


def test_unary_fn_is_fn_of_the_sum():
    D = 8
    h = torch.linspace(0.5, 2, D, dtype=torch.float64)
    center = torch.linspace(-1, 1, D, dtype=torch.float64)
    unary = lambda th: 0.5 * ((th - center) ** 2 * h).sum()  # noqa: E731
    a = get_estimates_vectorized_gauss(4, 1.0, unary_fn=unary, params=center, with_tqdm=False)
    b = get_estimates_vectorized_gauss(4, 1.0, fn=_quadratic(h), params=center, with_tqdm=False)
    torch.testing.assert_close(a.estimates, b.estimates, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="fn or unary_fn"):
        get_estimates_vectorized_gauss(4, 1.0, params=center)
    with pytest.raises(TypeError, match="params"):
        get_estimates_vectorized_gauss(4, 1.0, fn=_quadratic(h), params=[1.0, 2.0])


def test_diag_preconditioner_is_normalized_like_tyches():
    spec = torch.tensor([1e-8, 1e-4, 0.3, 2.0, 50.0])
    pre = diag_preconditioner(spec, eps=1e-3, exponent=0.5)
    raw = 1 / (spec.double().abs() ** 0.5 + 1e-3)
    p = torch.exp(torch.log(raw) - torch.log(raw).mean())  # tyche's formula, in float64
    torch.testing.assert_close(pre.p, p, rtol=1e-14, atol=0)
    assert abs(float(torch.log(pre.p).mean())) < 1e-15 and abs(pre.log_det) < 1e-13
    x = torch.randn(4, 5)
    out = pre(x)
    assert out.shape == (4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, x * p.float())
    torch.testing.assert_close(pre(x[0].double()), x[0].double() * p)
    with pytest.raises(ValueError, match="entries"):
        pre(torch.ones(2, 3))
    q = diag_preconditioner(spec, eps=0.0, exponent=1.0)
    torch.testing.assert_close(q.p, torch.exp(-torch.log(spec.double()) + torch.log(spec.double()).mean()))


# ----- agreement with localvol_fast.estimate_volume -------------------------------------------------------
@pytest.mark.parametrize("cost", ["quadratic", "star"])
def test_same_unit_directions_give_estimate_volumes_numbers(cost):
    D, n, seed, sigma, eps = 10, 12, 5, 0.6, 2e-2
    h = torch.logspace(-1, 1, D, dtype=torch.float64)
    anchor = torch.linspace(-0.4, 0.7, D, dtype=torch.float64)
    fn = _quadratic(h) if cost == "quadratic" else _star(h)
    batched = lambda th: torch.stack([fn(anchor, t - anchor) for t in th])  # noqa: E731
    v = torch.linspace(0.1, 3.0, D, dtype=torch.float64)
    core = estimate_volume(
        batched, anchor, cutoff=eps, n_samples=n, sigma=sigma, preconditioner=v, seed=seed, rtol=1e-7, backend="reference"
    )

    p = normalize_preconditioner(v)
    g = gaussian_directions(seed, torch.arange(n), D).double()
    w = g / g.norm(dim=1, keepdim=True) * p
    ours = estimate_along(
        w, log_det(p), center=anchor, fn=fn, base=0.0, gaussian=GaussianTerms(anchor, sigma),
        cutoff=eps, rtol=1e-7, iters=100, initial=1.0,
    )
    assert ours.status == core.status == ["converged"] * n
    torch.testing.assert_close(ours.props, core.props, rtol=1e-13, atol=0)
    torch.testing.assert_close(ours.mults * ours.props, core.radii, rtol=1e-9, atol=0)
    torch.testing.assert_close(ours.estimates, core.estimates, rtol=1e-10, atol=1e-8)


def test_random_directions_agree_with_estimate_volume_statistically():
    D, n, sigma, eps = 6, 1500, 0.8, 0.1
    h = torch.logspace(-0.5, 0.5, D, dtype=torch.float64)
    anchor = torch.linspace(-0.5, 0.5, D, dtype=torch.float64)
    fn = _star(h)
    batched = lambda th: torch.stack([fn(anchor, t - anchor) for t in th])  # noqa: E731
    core = estimate_volume(batched, anchor, cutoff=eps, n_samples=n, sigma=sigma, seed=1)
    ours = get_estimates_vectorized_gauss(n, sigma, fn=fn, params=anchor, cutoff=eps, seed=1, with_tqdm=False)
    a, b = torch.exp(core.estimates), torch.exp(ours.estimates)
    se = math.hypot(float(a.std()) / math.sqrt(n), float(b.std()) / math.sqrt(n))
    assert abs(float(a.mean()) - float(b.mean())) <= 4 * se, (float(a.mean()), float(b.mean()), se)
    assert abs(ours.log_volume - math.log(float(b.mean()))) < 1e-9


def test_float32_params_reach_fn_as_float32():
    D = 10
    seen = set()

    def fn(center, vec):
        if isinstance(vec, torch.Tensor):
            seen.add(vec.dtype)
        return 0.5 * (torch.as_tensor(vec).double() ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = get_estimates_vectorized_gauss(3, 1.0, fn=fn, params=torch.zeros(D), with_tqdm=False)
    assert seen == {torch.float32}
    assert res.estimates.dtype == torch.float64 and torch.isfinite(res.estimates).all()
