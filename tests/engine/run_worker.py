"""A run of estimate_volume in its own process, for the distributed and kill-and-resume tests.

    python tests/engine/run_worker.py OUT.json [--output JOURNAL] [--resume] [--n N] [--slow SECONDS] [--distributed]
"""

import argparse
import json
import time

import torch

from localvol_fast import estimate_volume

DIM = 40


def problem():
    anchor = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    h = torch.logspace(-1, 1, DIM, dtype=torch.float64)
    return anchor, h


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--output")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--n", type=int, default=23)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    anchor, h = problem()

    def cost(thetas):
        if args.slow:
            time.sleep(args.slow)
        d = thetas - anchor
        return 0.5 * (d * d * h).sum(1) * (1 + 0.3 * (d * d).sum(1))

    results = estimate_volume(
        cost, anchor, cutoff=[1e-2, 1e-4], n_samples=args.n, sigma=0.8, seed=9, batch_size=3,
        output=args.output, resume=args.resume, distributed=args.distributed,
    )
    rank = torch.distributed.get_rank() if args.distributed else 0
    with open(f"{args.out}.{rank}" if args.distributed else args.out, "w") as handle:
        json.dump([r.to_dict() for r in results], handle)


if __name__ == "__main__":
    main()
