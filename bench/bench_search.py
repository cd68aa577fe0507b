"""Benchmark of the batched radius search on the ellipsoid (the closed-form ground truth of the tests).

Reports seconds per run and evaluations per direction in ``extra_info``:
    python -m pytest bench/bench_search.py --benchmark-only
"""

import math

import pytest
import torch

from localvol_fast import estimate_volume, log_ball_volume


def _ellipsoid(dim):
    h = torch.logspace(-3, 3, dim, dtype=torch.float64)
    anchor = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return h, anchor, (lambda th: 0.5 * ((th - anchor) ** 2 * h).sum(1))


@pytest.mark.parametrize("preconditioned", [True, False], ids=["exact-preconditioner", "isotropic"])
def test_search_on_ellipsoid(benchmark, preconditioned):
    dim, eps, n = 1000, 1e-2, 256
    h, anchor, cost = _ellipsoid(dim)
    precond = h**-0.5 if preconditioned else None

    def run():
        return estimate_volume(cost, anchor, cutoff=eps, n_samples=n, measure="uniform", preconditioner=precond)

    result = benchmark(run)
    truth = log_ball_volume(dim) + 0.5 * float(torch.log(2 * eps / h).sum())
    benchmark.extra_info.update(
        evals_per_direction=result.evals_per_direction,
        max_evals=int(result.n_evals.max()),
        log_volume=result.log_volume,
        closed_form=truth,
        directions=n,
    )
    assert math.isfinite(result.log_volume)
