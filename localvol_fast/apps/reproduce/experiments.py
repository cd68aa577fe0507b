"""The paper's experiments on the digits MLP (MATH.md, "What the paper reports"), as plain data.

Each experiment is one function returning JSON-ready dicts and lists; ``reproduce_digits`` runs them
all, compares them with the paper (``verdicts``) and writes ``results.json``, ``report.md`` and the
plots (``report``). Every volume is the KL neighborhood of the trained network on its 1,024 training
inputs under the Gaussian prior N(0, sigma^2 I), sigma = ``digits.PRIOR_SIGMA`` (the L2 penalty's
prior), in nats.

Directions ("methods"): ``isotropic`` (uniform on the sphere), ``adam`` (Adam's second moment,
p = 1 / (sqrt(v) + 1e-5), the paper's choice), ``adam-m1`` (Adam's first moment |m| in its place),
``fisher`` (the diagonal Fisher F of the output distribution, p = 1 / (sqrt(F) + 1e-5): a
diagonal-curvature preconditioner like the paper's diag(H) and HesScale), and ``fisher-prior``
(p = (F / (2 eps) + 1 / sigma^2)^(-1/2): the semi-axes of the quadratic neighborhood F t^2 / 2 <= eps,
capped at the prior's scale sigma where the output ignores a parameter - not in the paper).
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from localvol_fast import __version__
from localvol_fast.apps.digits import PRIOR_SIGMA, TrainedDigits, train_digits
from localvol_fast.apps.reproduce.report import write_plots, write_report
from localvol_fast.apps.reproduce.verdicts import paper_comparison, quadratic_slope
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.nn.data import prepare_batches
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.fisher import fisher_diagonal
from localvol_fast.nn.parameters import ParameterLayout
from localvol_fast.nn.preconditioners import adam_preconditioner

METHODS = ("isotropic", "adam", "adam-m1", "fisher", "fisher-prior")


def _decades(low_exp: int, high_exp: int, per_decade: int = 1) -> list[float]:
    count = (high_exp - low_exp) * per_decade
    return [float(10.0 ** (low_exp + k / per_decade)) for k in range(count + 1)]


def settings(quick: bool = False) -> dict:
    """The experiment sizes: the default run (minutes on 2 CPU cores) or ``quick`` (about a minute)."""
    if quick:
        return {
            "steps": 200,
            "n_samples": 16,
            "cutoff": 1e-2,
            "checkpoint_steps": [1, 8, 64, 200],
            "trajectory_methods": ["isotropic", "adam", "fisher-prior"],
            "poison_fraction": 0.4,
            "poison_seeds": [0],
            "poison_methods": ["isotropic", "adam", "fisher-prior"],
            "sweep_cutoffs": [1e-4, 1e-2, 1.0, 1e2],
            "sweep_methods": list(METHODS),
            "scan_cutoffs": _decades(-6, 2),
            "scan_n_samples": 16,
            "seed": 0,
        }
    return {
        "steps": 500,
        "n_samples": 256,
        "cutoff": 1e-2,
        "checkpoint_steps": [1, 2, 4, 8, 16, 32, 64, 128, 256, 500],
        "trajectory_methods": ["isotropic", "adam", "fisher-prior"],
        "poison_fraction": 0.4,
        "poison_seeds": [0, 1, 2],
        "poison_methods": ["isotropic", "adam", "fisher-prior"],
        "sweep_cutoffs": _decades(-6, 2),
        "sweep_methods": list(METHODS),
        "scan_cutoffs": _decades(-6, 2, per_decade=2),
        "scan_n_samples": 256,
        "seed": 0,
    }


def planned_runs(config: dict) -> int:
    """How many volume estimates ``reproduce_digits`` makes with these settings (for progress)."""
    return (
        len(config["checkpoint_steps"]) * len(config["trajectory_methods"])
        + 2 * len(config["poison_seeds"]) * len(config["poison_methods"])
        + len(config["sweep_cutoffs"]) * len(config["sweep_methods"])
        + len(config["scan_cutoffs"])
    )


@functools.lru_cache(maxsize=32)
def trained(steps: int, poison_fraction: float = 0.0, seed: int = 0) -> TrainedDigits:
    """``train_digits`` memoized: ``estimate`` restores the model exactly, so runs can share it."""
    return train_digits(steps, poison_fraction=poison_fraction, seed=seed)


def anchor_norm_squared(run: TrainedDigits) -> float:
    return float(sum(p.detach().double().pow(2).sum() for p in run.model.parameters()))


def prior_ceiling(run: TrainedDigits, sigma: float = PRIOR_SIGMA) -> float:
    """-|theta0|^2 / (2 sigma^2): where the paper sees the volume saturate at large eps (nats)."""
    return -anchor_norm_squared(run) / (2 * sigma**2)


_FISHER_CACHE: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}


def _fisher_of(run: TrainedDigits) -> torch.Tensor:
    """The diagonal Fisher (D,) of a trained network on its training inputs, computed once per network."""
    cached = _FISHER_CACHE.get(id(run.model))
    if cached is not None and cached[0] is run.model:
        return cached[1]
    layout = ParameterLayout(run.model.named_parameters())
    batches, _ = prepare_batches(run.x_train, run.x_train.device)
    diagonal, _ = fisher_diagonal(lambda batch: run.model(*batch.args), layout, batches, passes=16, seed=0)
    _FISHER_CACHE[id(run.model)] = (run.model, diagonal)
    return diagonal


def fisher_prior_preconditioner(run: TrainedDigits, cutoff: float, sigma: float = PRIOR_SIGMA) -> torch.Tensor:
    """p_i = (F_i / (2 eps) + 1 / sigma^2)^(-1/2), F the diagonal Fisher at the anchor, (D,) float64.

    The quadratic neighborhood F t^2 / 2 <= eps has semi-axes sqrt(2 eps / F_i); where F_i is ~0 (a
    weight of an always-blank pixel, a dead unit) the axis is infinite and the plain Fisher preconditioner
    sends nearly every direction along it. The prior bounds what such a direction can add, so the axis
    is capped at sigma.
    """
    return (_fisher_of(run) / (2 * cutoff) + 1.0 / sigma**2).rsqrt()


def method_options(run: TrainedDigits, method: str, cutoff: float = 1e-2) -> dict:
    """The ``estimate`` keyword arguments selecting a direction distribution."""
    if method == "isotropic":
        return {"preconditioner": None}
    if method == "adam":
        return {"preconditioner": "adam", "optimizer": run.optimizer}
    if method == "adam-m1":
        return {"preconditioner": adam_preconditioner(run.optimizer, moment=1)}
    if method == "fisher":
        return {"preconditioner": "fisher"}
    if method == "fisher-prior":
        return {"preconditioner": fisher_prior_preconditioner(run, cutoff)}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def record_of(result: VolumeResult, *, keep_estimates: bool = True, **extra) -> dict:
    """A plain-data summary of one run (nats)."""
    low, high = result.log_volume_interval
    finite = result.estimates[torch.isfinite(result.estimates)]
    record = {
        **extra,
        "cutoff": result.cutoff,
        "log_volume": result.log_volume,
        "log10_volume": result.log10_volume,
        "interval": [low, high],
        "max_estimate": float(result.estimates.max()),
        "median_estimate": float(finite.median()) if finite.numel() else -math.inf,
        "effective_sample_size": result.effective_sample_size,
        "evals_per_direction": result.evals_per_direction,
        "n_samples": result.n_samples,
        "status": result.status_counts(),
        "seconds": result.info.get("seconds_total", result.info.get("seconds")),
    }
    if keep_estimates:
        record["estimates"] = result.estimates.tolist()
    return record


def volume(
    run: TrainedDigits, method: str, *, cutoff: float, n_samples: int, seed: int = 0, progress: bool = False
) -> VolumeResult:
    """One KL-neighborhood estimate of a trained digits MLP under the paper's Gaussian prior."""
    with warnings.catch_warnings():
        # Unbounded / non-monotone directions are expected here; they are counted in ``status``.
        warnings.simplefilter("ignore", RuntimeWarning)
        return estimate(
            run.model,
            run.x_train,
            cutoff=cutoff,
            n_samples=n_samples,
            sigma=PRIOR_SIGMA,
            seed=seed,
            progress=progress,
            **method_options(run, method, cutoff),
        )


Callback = Callable[[str, dict], None] | None


def _measured(
    run: TrainedDigits,
    method: str,
    fields: dict,
    *,
    label: str,
    on_run: Callback,
    keep_estimates: bool = True,
    **options,
) -> dict:
    """One ``volume`` estimate (``options``: cutoff, n_samples, seed) as a ``record_of`` with ``fields``
    in front, reported to ``on_run`` under ``label``."""
    record = record_of(volume(run, method, **options), keep_estimates=keep_estimates, **fields)
    if on_run is not None:
        on_run(label, record)
    return record


def training_trajectory(
    checkpoint_steps: Sequence[int],
    *,
    methods: Sequence[str] = ("isotropic", "adam"),
    cutoff: float = 1e-2,
    n_samples: int = 64,
    seed: int = 0,
    on_run: Callback = None,
) -> dict:
    """(1) Log volume over training: the network (and Adam state) after each of ``checkpoint_steps``.

    Returns {"series": {method: [record with step, test_accuracy, ...]}, "cutoff": eps}.
    """
    series = {m: [] for m in methods}
    for step in checkpoint_steps:
        if step < 1:
            raise ValueError(f"checkpoint steps must be >= 1 (Adam has no state before a step), got {step}")
        run = trained(int(step), 0.0, seed)
        accuracy = run.accuracy()
        for method in methods:
            fields = {"step": int(step), "method": method, "test_accuracy": accuracy}
            label = f"training step {step} {method}"
            options = {"cutoff": cutoff, "n_samples": n_samples, "seed": seed, "keep_estimates": False}
            series[method].append(_measured(run, method, fields, label=label, on_run=on_run, **options))
    return {"cutoff": cutoff, "series": series}


def poisoning(
    steps: int,
    *,
    poison_fraction: float = 0.4,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] = ("isotropic", "adam"),
    cutoff: float = 1e-2,
    n_samples: int = 64,
    on_run: Callback = None,
) -> dict:
    """(2) Clean vs label-poisoned training, per seed and method.

    Returns {"runs": [record with kind ("clean"/"poisoned"), seed, method, accuracies], "means":
    {method: {"clean": mean log volume, "poisoned": ...}}}.
    """
    runs = []
    for seed in seeds:
        for kind, fraction in (("clean", 0.0), ("poisoned", poison_fraction)):
            run = trained(int(steps), float(fraction), int(seed))
            test_accuracy = run.accuracy()
            train_accuracy = run.accuracy(run.x_train, run.y_train)
            for method in methods:
                fields = {
                    "kind": kind,
                    "seed": int(seed),
                    "method": method,
                    "poison_fraction": fraction,
                    "test_accuracy": test_accuracy,
                    "train_accuracy": train_accuracy,
                    "anchor_norm_squared": anchor_norm_squared(run),
                }
                label = f"{kind} seed {seed} {method}"
                options = {"cutoff": cutoff, "n_samples": n_samples, "seed": seed}
                runs.append(_measured(run, method, fields, label=label, on_run=on_run, **options))
    means = {
        m: {
            kind: sum(r["log_volume"] for r in runs if r["method"] == m and r["kind"] == kind) / len(seeds)
            for kind in ("clean", "poisoned")
        }
        for m in methods
    }
    return {"steps": steps, "cutoff": cutoff, "poison_fraction": poison_fraction, "runs": runs, "means": means}


def preconditioner_comparison(
    steps: int,
    *,
    cutoffs: Sequence[float],
    methods: Sequence[str] = METHODS,
    n_samples: int = 64,
    seed: int = 0,
    on_run: Callback = None,
) -> dict:
    """(3) Direction distributions compared over an eps sweep, as the paper ranks them.

    The paper's figure is the best (over eps) max per-direction log estimate; ours is computed the
    same way, alongside the log-mean-exp. Returns {"sweep": {method: [record]}, "best": {method:
    {"best_max_estimate", "at_cutoff", "best_log_volume"}}, "ranking": methods best first}.
    """
    run = trained(int(steps), 0.0, seed)
    sweep = {m: [] for m in methods}
    for method in methods:
        for cutoff in cutoffs:
            label = f"{method} eps={cutoff:g}"
            options = {"cutoff": cutoff, "n_samples": n_samples, "seed": seed}
            sweep[method].append(_measured(run, method, {"method": method}, label=label, on_run=on_run, **options))
    best = {}
    for method, records in sweep.items():
        top = max(records, key=lambda r: r["max_estimate"])
        best[method] = {
            "best_max_estimate": top["max_estimate"],
            "at_cutoff": top["cutoff"],
            "best_log_volume": max(r["log_volume"] for r in records),
        }
    ranking = sorted(best, key=lambda m: best[m]["best_max_estimate"], reverse=True)
    return {"steps": steps, "cutoffs": list(cutoffs), "sweep": sweep, "best": best, "ranking": ranking}


def cutoff_scan(
    steps: int,
    *,
    cutoffs: Sequence[float],
    n_samples: int = 128,
    seed: int = 0,
    method: str = "isotropic",
    on_run: Callback = None,
) -> dict:
    """(4) Log volume against eps (the paper scans 1e-6 .. 1e2), with D, D/2 and the prior ceiling.

    Returns {"records": [...], "dim", "half_dim", "quadratic_slope" (fit over eps <= 1e-3),
    "ceiling" = -|theta0|^2 / (2 sigma^2)}.
    """
    run = trained(int(steps), 0.0, seed)
    records = []
    for cutoff in cutoffs:
        label = f"scan eps={cutoff:g}"
        options = {"cutoff": cutoff, "n_samples": n_samples, "seed": seed, "keep_estimates": False}
        records.append(_measured(run, method, {"method": method}, label=label, on_run=on_run, **options))
    dim = sum(p.numel() for p in run.model.parameters())
    return {
        "steps": steps,
        "method": method,
        "records": records,
        "dim": dim,
        "half_dim": dim / 2,
        "quadratic_slope": quadratic_slope(records),
        "ceiling": prior_ceiling(run),
        "sigma": PRIOR_SIGMA,
    }


def reproduce_digits(
    out_dir, *, quick: bool = False, n_samples: int | None = None, seed: int = 0, progress: bool = True
) -> dict:
    """Run the four experiments, write results.json, report.md and the plots into ``out_dir``.

    Returns the results dict (what results.json holds).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = settings(quick)
    config["seed"] = seed
    if n_samples is not None:
        config["n_samples"] = n_samples
        config["scan_n_samples"] = n_samples
    started = time.perf_counter()
    results = {"format": "localvol_fast.reproduce.digits", "version": __version__, "quick": quick, "settings": config}
    results.update(run_experiments(config, progress=progress))
    results["dim"] = results["cutoff_scan"]["dim"]
    results["paper_comparison"] = paper_comparison(results)
    results["plots"] = write_plots(results, out)
    results["seconds"] = time.perf_counter() - started
    results["files"] = {"report": str(out / "report.md"), "results": str(out / "results.json")}
    write_report(results, out / "report.md")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def run_experiments(config: dict, *, progress: bool = True) -> dict:
    """The four experiments with ``settings``-shaped ``config``: {"training", "poisoning", "preconditioners",
    "cutoff_scan"}, with one progress bar over all their estimates."""
    bar = ProgressBar(planned_runs(config), label="estimates", enabled=progress)

    def on_run(label: str, record: dict) -> None:
        bar.update(1, run=label.replace(" ", "_"), log_volume=record["log_volume"], evals=record["evals_per_direction"])

    seed, steps, cutoff = config["seed"], config["steps"], config["cutoff"]
    shared = {"n_samples": config["n_samples"], "on_run": on_run}
    results = {
        "training": training_trajectory(
            config["checkpoint_steps"], methods=config["trajectory_methods"], cutoff=cutoff, seed=seed, **shared
        ),
        "poisoning": poisoning(
            steps,
            poison_fraction=config["poison_fraction"],
            seeds=[seed + s for s in config["poison_seeds"]],
            methods=config["poison_methods"],
            cutoff=cutoff,
            **shared,
        ),
        "preconditioners": preconditioner_comparison(
            steps, cutoffs=config["sweep_cutoffs"], methods=config["sweep_methods"], seed=seed, **shared
        ),
        "cutoff_scan": cutoff_scan(
            steps, cutoffs=config["scan_cutoffs"], n_samples=config["scan_n_samples"], seed=seed, on_run=on_run
        ),
    }
    bar.close()
    return results
