"""The sequential estimate beside the ray estimates on the real digits MLP: the first measured bias of the
paper's estimator on a real network.

The network is the paper's digits MLP (``train_paper_digits(seed)``, D = 4,810), the cost the true KL of
its outputs from the anchor's on ``--inputs`` training inputs (the first ones of its training split), the
KL cutoff 1e-2 and the Gaussian prior sigma = 1.3975 of ``localvol reproduce digits``. Every method sees
the same cost through ``localvol_fast.estimate``:
- rays: isotropic, Adam's second moment (the run's own optimizer) and the output Fisher's eigenbasis
  ("hessian-eigen", rotated back), each at ``preconditioner_eps="auto"``, ``--directions`` directions;
- sequential: ``method="sequential"`` with the exact output Fisher's eigenbasis as its surrogate,
  ``--particles`` per replicate, ``--replicates`` replicates, ``--moves-per-step`` HMC moves (6), no pilot
  (as ``estimate`` runs it); its state is checkpointed (``--checkpoint``), so an interrupted run resumes
  where it stopped.

No truth is known here: the ray estimates are lower bounds in expectation, the sequential one is
consistent with a replicate interval (which a bias the replicates share would not show; on the quartic
surrogates of this network, bench/accuracy.py measures that bias). Writes
``bench/results/real_network.{json,md}``. The full run took 65 minutes with 2 moves per step on a shared
core (``--inputs 256``); 6 moves cost about 3 times as many evaluations.

    python bench/real_network.py [--inputs 256] [--particles 200] [--replicates 4] [--moves-per-step 6] [--directions 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from provenance import short_commit  # noqa: E402

import localvol_fast as lv  # noqa: E402
from localvol_fast.apps.digits import PRIOR_SIGMA, train_paper_digits

RESULTS = Path(__file__).resolve().parent / "results"
CUTOFF = 1e-2
RAY_METHODS = {
    "rays-isotropic": {},
    "rays-adam": {"preconditioner": "adam", "preconditioner_eps": "auto"},
    "rays-fisher-eigenbasis": {"preconditioner": "hessian-eigen", "preconditioner_eps": "auto"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=256, help="training inputs the KL is averaged over")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="the estimators' seed")
    parser.add_argument("--directions", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=200)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--moves-per-step", type=int, default=6, help="HMC moves per step (estimate's default, 6)")
    parser.add_argument("--start-cutoff", type=float, default=None,
                        help="the sequential's start_cutoff (default: the cutoff itself; e.g. 0.1 for a 10 x wider start)")
    parser.add_argument("--max-evaluations", type=int, default=5_000_000)
    parser.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent / ".cache" / "real_network.state")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-sequential", action="store_true", help="the ray rows only (minutes)")
    parser.add_argument("--skip-rays", action="store_true", help="the sequential row only")
    return parser.parse_args(argv)


def ray_rows(run, x, args) -> list[dict]:
    rows = []
    for name, options in RAY_METHODS.items():
        if options.get("preconditioner") == "adam":
            options = {**options, "optimizer": run.optimizer}
        started = time.perf_counter()
        result = lv.estimate(run.model, x, cutoff=CUTOFF, sigma=PRIOR_SIGMA, n_samples=args.directions, seed=args.seed,
                             progress=False, **options)
        low, high = result.log_volume_interval if hasattr(result, "log_volume_interval") else (math.nan, math.nan)
        choice = result.info.get("preconditioner", {}).get("eps_choice", {})
        pilot = sum(f["evaluations"] for f in choice.get("per_eps", []))  # the eps' pilot's directions
        rows.append({"method": name, "log_volume": result.log_volume, "interval": [low, high],
                     "evaluations": int(result.n_evals.sum()) + pilot, "seconds": time.perf_counter() - started,
                     "preconditioner_eps": result.info.get("preconditioner", {}).get("eps"),
                     "ess": getattr(result, "ess", None)})
        print(f"[real-network] {name}: {result.log_volume:,.1f} nats ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def sequential_row(run, x, args) -> dict:
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = lv.estimate(run.model, x, method="sequential", cutoff=CUTOFF, sigma=PRIOR_SIGMA, n_samples=args.particles,
                         n_replicates=args.replicates, moves_per_step=args.moves_per_step, curvature="fisher-eigen",
                         start_cutoff=args.start_cutoff, seed=args.seed,
                         max_evaluations=args.max_evaluations, output=args.checkpoint, resume=args.checkpoint.exists(),
                         progress=True)
    low, high = result.log_volume_interval
    row = {"method": "sequential", "log_volume": result.log_volume, "interval": [low, high],
           "replicates": result.replicate_log_volumes[0], "evaluations": result.evaluations,
           "seconds_this_session": time.perf_counter() - started, "seconds": result.seconds,
           "complete": result.complete, "steps": len(result.steps), "config": result.config, "notes": result.notes}
    print(f"[real-network] sequential: {result.log_volume:,.1f} nats [{low:,.1f}, {high:,.1f}], "
          f"{result.evaluations:,} evaluations", flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The sequential estimate beside the rays on the real digits MLP",
        "",
        f"Written by `{meta['command']}` at git {meta['git']} on {meta['machine']}, {meta['wall_seconds']:.0f} s. "
        f"D = {meta['dim']:,}, the KL on {meta['inputs']} training inputs, KL cutoff {CUTOFF:g}, sigma {PRIOR_SIGMA:.4f}, "
        f"training seed {meta['train_seed']}, estimator seed {meta['seed']}.",
        "",
        "| method | log volume (nats) | 95% interval | below the sequential estimate (nats) | evaluations | seconds |",
        "|---|---|---|---|---|---|",
    ]
    reference = next((r["log_volume"] for r in rows if r["method"] == "sequential"), math.nan)
    for r in rows:
        low, high = r["interval"]
        interval = f"[{low:,.1f}, {high:,.1f}]" if math.isfinite(low) else "none"
        below = reference - r["log_volume"] if r["method"] != "sequential" else math.nan
        lines.append(f"| {r['method']} | {r['log_volume']:,.1f} | {interval} | "
                     f"{'' if not math.isfinite(below) else f'{below:,.1f}'} | {r['evaluations']:,} | {r['seconds']:.0f} |")
    sequential = next((r for r in rows if r["method"] == "sequential"), None)
    if sequential is not None:
        config = sequential["config"]
        lines += ["", f"Sequential: {config.get('n_replicates')} replicates x {config.get('n_particles')} particles, "
                  f"{config.get('moves_per_step')} {config.get('kernel')} moves per step, start cutoff "
                  f"{config.get('start_cutoff', CUTOFF):g}, {sequential['steps']} steps; "
                  "the replicates' estimates: " + ", ".join(f"{v:,.1f}" for v in sequential["replicates"])
                  + " (the interval is theirs: t with R - 1 degrees of freedom)."]
        if sequential["seconds_this_session"] < 0.5 * sequential["seconds"]:
            lines += ["", f"The sequential row was read back from its checkpoint (`--checkpoint`): its {sequential['seconds']:,.0f} s "
                      "are those of the run that computed it, not of this one."]
    lines += ["", "Evaluations: cost evaluations (the KL over the inputs at one parameter point), the rays' eps pilot "
              "included; each of the sequential method's comes with its gradient for the HMC moves (one forward and one "
              "backward pass)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    began = time.perf_counter()
    run = train_paper_digits(seed=args.train_seed)
    x = run.x_train[: args.inputs]
    rows = [] if args.skip_rays else ray_rows(run, x, args)
    if not args.skip_sequential:
        rows.append(sequential_row(run, x, args))
    meta = {"command": "python bench/real_network.py " + " ".join(sys.argv[1:] if argv is None else argv), "git": short_commit(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "wall_seconds": time.perf_counter() - began,
            "dim": sum(p.numel() for p in run.model.parameters()), "inputs": int(x.shape[0]),
            "train_seed": args.train_seed, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_network.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (args.out / "real_network.md").write_text(markdown(rows, meta))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
