"""Speed of the estimator on the benchmark models: our default path, our reference backend, the baseline.

Run with ``python -m pytest bench/bench_speed.py --benchmark-only`` (about two minutes on a 2-core CPU).
Each benchmark estimates a small fixed number of directions (the same ones, same seed, for every method)
and records forward passes and seconds per direction in ``extra_info``. The one-table comparison with
ratios, version and machine information is ``bench/compare.py``.
"""

from __future__ import annotations

import pytest
import torch

# bench/ is not a package: compare.py loads bench/models.py by path, and both files use that one module.
from compare import bench_models

import localvol_fast as lv
from localvol_fast.apps.baseline import baseline_estimate

DIRECTIONS = {"digits_mlp": 32, "large_mlp": 8, "tiny_lm": 3}
THREADS = 1  # as compare.py: on this shared 2-core machine 2 threads stall behind a busy neighbour


@pytest.fixture(autouse=True)
def _fixed_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


def _record(benchmark, n, evals, forwards, seconds, statuses, dim):
    benchmark.extra_info.update(
        directions=n,
        dim=dim,
        threads=THREADS,
        evals_per_direction=float(evals) / n,
        forward_passes_per_direction=float(forwards) / n,
        seconds_per_direction=float(seconds) / n,
        converged=sum(s == "converged" for s in statuses),
    )


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("model_name", list(DIRECTIONS))
def test_estimate(benchmark, model_name, backend):
    bm = bench_models.build(model_name)
    n = DIRECTIONS[model_name]

    def run():
        return lv.estimate(
            bm.model,
            bm.data,
            cutoff=bm.cutoff,
            n_samples=n,
            sigma=bm.sigma,
            seed=0,
            rtol=bench_models.RTOL,
            progress=False,
            backend=backend,
        )

    result = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    seconds = result.info.get("seconds_total", result.info.get("seconds"))
    _record(benchmark, n, int(result.n_evals.sum()), int(result.n_evals.sum()), seconds, result.status, result.dim)
    benchmark.extra_info.update(
        backend=result.config.get("backend"),
        model_forward_calls=result.info.get("forward_passes"),
        evaluation=result.info.get("evaluation"),
    )
    assert result.n_samples == n


@pytest.mark.parametrize("model_name", list(DIRECTIONS))
def test_baseline(benchmark, model_name):
    bm = bench_models.build(model_name)
    n = DIRECTIONS[model_name]

    def run():
        return baseline_estimate(
            bm.model, bm.data, cutoff=bm.cutoff, n_samples=n, sigma=bm.sigma, seed=0, rtol=bench_models.RTOL
        )

    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _record(
        benchmark,
        n,
        int(out["evals"].sum()),
        int(out["forward_passes"].sum()),
        out["seconds_total"],
        out["status"],
        out["dim"],
    )
    assert len(out["status"]) == n
