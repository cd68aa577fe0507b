"""Benchmark of log_radial_integral on 1e6 directions' worth of realistic (n, a, b, r).

Run with `pytest bench/ --benchmark-only`. The inputs mimic the Gaussian-measure estimator (MATH.md,
"Gaussian"): n = D - 1 for D from 1e3 to 1e10, a = 1 / sigma^2 with sigma from 1e-3 to 1,
b = -(w . theta0) / sigma^2 with |w . theta0| up to a few times |theta0|, and radii mostly far below
the peak (the endpoint-dominated case), some near or beyond it and some infinite.
"""

from __future__ import annotations

import math

import torch

from localvol_fast.core.radial import log_radial_integral

SIZE = 1_000_000


def realistic_inputs(size: int = SIZE, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)

    n = torch.floor(10 ** uniform(3, 10)) - 1  # D - 1
    sigma = 10 ** uniform(-3, 0)
    a = 1 / sigma**2
    anchor_norm = sigma * torch.sqrt(n + 1) * uniform(0.5, 2)  # |theta0| ~ sigma sqrt(D)
    b = -anchor_norm * torch.randn(size, generator=generator, dtype=torch.float64) / sigma**2
    peak = (b + torch.sqrt(b * b + 4 * a * n)) / (2 * a)
    r = peak * 10 ** uniform(-4, 1)  # mostly r << peak
    r = torch.where(uniform(0, 1) < 0.05, math.inf, r)
    return n, a, b, r


def test_log_radial_integral_1e6(benchmark):
    n, a, b, r = realistic_inputs()
    out = benchmark.pedantic(log_radial_integral, args=(n, a, b, r), rounds=3, iterations=1, warmup_rounds=0)
    assert out.shape == (SIZE,) and torch.isfinite(out).all()
