"""How the sequential estimator's bias depends on its moves per step and its population, against an exact
truth: one table, configuration x seeds -> gap, interval, covered.

    python bench/sequential_mixing.py [--configs 200x2,200x4,200x6,800x2] [--seeds 4] [--dim 400] [--out DIR]

The problem is a separable quartic, C(y) = sum_i lam_i (y_i - y0_i)^2 / 2 + kappa (y_i - y0_i)^4, with half
its curvatures zero (flat directions the quartic term alone bounds), kappa 2, cutoff 0.5, the unit
Gaussian prior, D = --dim (400): small enough for many seeds, hard enough that the sampler lags. Its truth
is exact (``core.separable.separable_log_volume``, per-coordinate quadrature). Each configuration NxM is N
particles per replicate and M HMC moves per step (4 replicates, 10 leapfrog steps, no pilot); each runs
seeds 0..--seeds-1. A finite population's lag biases log V low; the table shows by how much, and whether
the replicates' interval (t, 3 degrees of freedom) still covers the truth. Writes
``sequential_mixing.{md,json}`` to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from provenance import short_commit  # noqa: E402

from localvol_fast.core.separable import separable_log_volume  # noqa: E402
from localvol_fast.engine.sequential import sequential_volume

RESULTS = Path(__file__).resolve().parent / "results"
KAPPA, CUTOFF, SIGMA = 2.0, 0.5, 1.0


def problem(dim: int, seed: int = 11):
    """Curvatures uniform in [0, 10) with half of them zero, and an anchor of unit scale."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(dim, generator=g, dtype=torch.float64) * 10
    lam = lam * (torch.rand(dim, generator=g, dtype=torch.float64) < 0.5)
    return lam, torch.randn(dim, generator=g, dtype=torch.float64)


def config(text: str) -> tuple[int, int]:
    try:
        particles, moves = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a configuration is PARTICLESxMOVES such as 200x2, got {text!r}") from None
    if particles < 2 or moves < 1:
        raise SystemExit(f"{text!r}: need at least 2 particles and 1 move per step")
    return particles, moves


def run(dim: int, configs: list[tuple[int, int]], seeds: int) -> tuple[float, list[dict]]:
    lam, y0 = problem(dim)

    def cost(y):
        d = y - y0
        return (0.5 * lam * d**2 + KAPPA * d**4).sum(-1)

    truth = separable_log_volume(lam.numpy(), y0.numpy(), cutoff=CUTOFF, quartic=KAPPA, sigma=SIGMA).log_volume
    rows = []
    for particles, moves in configs:
        for seed in range(seeds):
            started = time.perf_counter()
            result = sequential_volume(cost, y0, cutoff=CUTOFF, sigma=SIGMA, curvature=lam, n_particles=particles,
                                       moves_per_step=moves, seed=seed, kernel="hmc", progress=False)
            low, high = result.log_volume_interval
            rows.append({"particles": particles, "moves_per_step": moves, "seed": seed,
                         "gap": result.log_volume - truth, "interval": [low - truth, high - truth],
                         "covers": low <= truth <= high,
                         "replicate_gaps": [v - truth for v in result.replicate_log_volumes[0]],
                         "evaluations": result.evaluations, "steps": len(result.steps),
                         "seconds": time.perf_counter() - started})
            r = rows[-1]
            print(f"[mixing] {particles}x{moves} seed {seed}: gap {r['gap']:+.2f} "
                  f"[{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}] {r['evaluations']:,} evaluations "
                  f"{r['seconds']:.0f} s", flush=True)
    return truth, rows


def markdown(truth: float, rows: list[dict], meta: dict) -> str:
    lines = ["# Sequential estimator: bias against moves per step and particles", "",
             f"`{meta['command']}` at git {meta['git']}, {meta['machine']}, {meta['wall_seconds']:.0f} s. "
             f"Separable quartic, D = {meta['dim']}, kappa {KAPPA:g}, cutoff {CUTOFF:g}, sigma {SIGMA:g}; "
             f"truth {truth:.3f} nats (quadrature). Gaps in nats (estimate - truth); interval: the 95% replicate "
             "interval, as gaps.", "",
             "| particles x moves | seeds | mean gap | sd | covered | evaluations per seed | gaps (intervals) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key in dict.fromkeys((r["particles"], r["moves_per_step"]) for r in rows):
        these = [r for r in rows if (r["particles"], r["moves_per_step"]) == key]
        gaps = [r["gap"] for r in these]
        sd = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
        each = "; ".join(f"{r['gap']:+.2f} [{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}]" for r in these)
        lines.append(f"| {key[0]} x {key[1]} | {len(these)} | {statistics.fmean(gaps):+.2f} | {sd:.2f} | "
                     f"{sum(r['covers'] for r in these)}/{len(these)} | "
                     f"{statistics.fmean(r['evaluations'] for r in these):,.0f} | {each} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="200x2,200x4,200x6,800x2", help="PARTICLESxMOVES, comma-separated")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.dim < 2:
        parser.error(f"--seeds and --dim must be at least 2, got {args.seeds} and {args.dim}")
    configs = [config(c) for c in args.configs.split(",") if c.strip()]
    began = time.perf_counter()
    truth, rows = run(args.dim, configs, args.seeds)
    meta = {"command": "python bench/sequential_mixing.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "git": short_commit(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "wall_seconds": time.perf_counter() - began, "dim": args.dim, "truth": truth}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequential_mixing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "sequential_mixing.md").write_text(markdown(truth, rows, meta))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
