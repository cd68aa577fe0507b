"""The paper's experiments on the digits MLP (MATH.md, "The paper's digits setup"), as plain data.

Each experiment is one function returning JSON-ready dicts and lists; ``reproduce_digits`` runs them
all, compares them with the paper (``verdicts``) and writes ``results.json``, ``report.md`` and the
plots (``report``). Every network is trained with the paper's recipe (``digits.train_paper_digits``).
Every volume is the KL neighborhood of the trained network on its 1,024 training inputs under the
Gaussian prior N(0, sigma^2 I), sigma = ``digits.PRIOR_SIGMA`` (the L2 penalty's prior), in nats.

Direction distributions ("methods"; p = 1 / (|s|^0.5 + eps) normalized to det P = 1, eps the
preconditioner's additive eps, NOT the KL cutoff): ``isotropic``; ``adam`` (s = Adam's raw second
moment); ``adam-m1`` (|raw first moment|); ``diag-h`` (the exact diagonal of the KL's Hessian at the
anchor, i.e. of the output Fisher); ``hesscale`` (Elsayed & Mahmood 2022); ``hessian-eigen`` (the full
Hessian's eigenbasis, P = Q diag(p): directions rotated back into parameter space);
``hessian-paper-code`` (the same eigenvalues as the paper's code applies them: it never rotates back, so
its directions are diag(p) Q^T u, distributed as diag(p) u: a diagonal preconditioner that gives flat
parameter j, in JAX's ravel order, the scale of the j-th smallest eigenvalue; ``paper_code_hessian_diagonal``);
``fisher`` (the sampled Fisher diagonal, 16 passes: not in the paper's table).
A method the library refuses at run time (e.g. hessian-eigen above its size limit) is listed as skipped.

The preconditioner table follows the paper: cutoff FIXED at 1e-2, eps swept over
{1e1, 1, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5}, 3,000 directions (seed 42) per setting; a row's figure is the
best over eps of the largest per-direction estimate ("best max log-estimate"), repeated per training seed.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from localvol_fast import __version__
from localvol_fast.apps.digits import (
    PAPER_STEPS,
    PRIOR_SIGMA,
    TrainedDigits,
    train_paper_digits,
)
from localvol_fast.apps.reproduce.report import write_plots, write_report
from localvol_fast.apps.reproduce.verdicts import paper_comparison, quadratic_slope
from localvol_fast.core.preconditioners import inverse_power_preconditioner
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.parameters import ParameterLayout
from localvol_fast.nn.preconditioners import adam_preconditioner, curvature_preconditioner, exact_curvature

# Table rows in the paper's order (isotropic first), then ours; each with the library name it needs.
METHODS = ("isotropic", "diag-h", "hesscale", "adam", "adam-m1", "hessian-eigen", "hessian-paper-code", "fisher")
LIBRARY_NAME = {"adam": "adam", "diag-h": "diag-h", "hesscale": "hesscale", "hessian-eigen": "hessian-eigen", "fisher": "fisher"}
EPS_GRID = (1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # the paper's sweep of the preconditioner eps
DIRECTION_SEED = 42  # the paper's seed for its directions
# The trajectory and poisoning experiments use Adam at the paper's best eps for it (MATH.md: 1e-3),
# not 1e-5, where the blank pixels' weights take nearly all of |P u| and cost 13,000+ nats.
GOOD_ADAM_EPS = 1e-3


def settings(quick: bool = False) -> dict:
    """The experiment sizes: the default run (see report.md for its time on 2 CPU cores) or ``quick``."""
    if quick:
        return {
            "table_seeds": [0], "table_n_samples": 48, "eps_grid": [1e-1, 1e-2, 1e-3],
            "table_methods": ["isotropic", "adam", "adam-m1", "fisher", "diag-h", "hesscale"],
            "cutoff": 1e-2, "n_samples": 32,
            "checkpoint_steps": [1, 16, 100, PAPER_STEPS], "trajectory_methods": ["isotropic", "adam"],
            "poison_fraction": 0.4, "poison_seeds": [0], "poison_methods": ["isotropic", "adam"],
            "scan_cutoffs": [1e-6, 1e-4, 1e-2, 1.0, 1e2], "scan_n_samples": 32, "seed": 0,
        }
    return {
        "table_seeds": [0, 1, 2], "table_n_samples": 3000, "eps_grid": list(EPS_GRID),
        "table_methods": list(METHODS),
        "cutoff": 1e-2, "n_samples": 256,
        "checkpoint_steps": [1, 2, 4, 8, 16, 32, 64, 128, 256, PAPER_STEPS],
        "trajectory_methods": ["isotropic", "adam"],
        "poison_fraction": 0.4, "poison_seeds": [0, 1, 2], "poison_methods": ["isotropic", "adam"],
        "scan_cutoffs": _decades(-6, 2, per_decade=2), "scan_n_samples": 256, "seed": 0,
    }


def _decades(low_exp: int, high_exp: int, per_decade: int = 1) -> list[float]:
    count = (high_exp - low_exp) * per_decade
    return [float(10.0 ** (low_exp + k / per_decade)) for k in range(count + 1)]


def planned_runs(config: dict) -> int:
    """How many volume estimates ``reproduce_digits`` makes with these settings (for progress)."""
    methods = config["table_methods"]
    per_seed = sum(1 if m == "isotropic" else len(config["eps_grid"]) for m in methods)
    return (
        per_seed * len(config["table_seeds"])
        + len(config["checkpoint_steps"]) * len(config["trajectory_methods"])
        + 2 * len(config["poison_seeds"]) * len(config["poison_methods"])
        + len(config["scan_cutoffs"])
    )


@functools.lru_cache(maxsize=32)
def trained(seed: int = 0, poison_fraction: float = 0.0, stop_after: int | None = None) -> TrainedDigits:
    """``train_paper_digits`` memoized: ``estimate`` restores the model exactly, so runs can share it."""
    return train_paper_digits(seed, poison_fraction=poison_fraction, stop_after=stop_after)


def anchor_norm_squared(run: TrainedDigits) -> float:
    return float(sum(p.detach().double().pow(2).sum() for p in run.model.parameters()))


def prior_ceiling(run: TrainedDigits, sigma: float = PRIOR_SIGMA) -> float:
    """-|theta0|^2 / (2 sigma^2): where the paper sees the volume saturate at large eps (nats)."""
    return -anchor_norm_squared(run) / (2 * sigma**2)


def method_options(run: TrainedDigits, method: str, eps=GOOD_ADAM_EPS) -> dict:
    """The ``estimate`` keyword arguments selecting a direction distribution at preconditioner eps."""
    if method == "isotropic":
        return {"preconditioner": None}
    if method == "adam":
        return {"preconditioner": "adam", "optimizer": run.optimizer, "preconditioner_eps": eps}
    if method == "adam-m1":
        # The library's "adam" name reads the second moment; the first goes in as a (D,) tensor.
        return {"preconditioner": adam_preconditioner(run.optimizer, moment=1, eps=eps)}
    if method == "hessian-eigen":
        return {"preconditioner": hessian_eigenbasis(run, eps)}
    if method == "hessian-paper-code":
        return {"preconditioner": paper_code_hessian_diagonal(run, eps)}
    if method in LIBRARY_NAME:
        return {"preconditioner": LIBRARY_NAME[method], "preconditioner_eps": eps}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


_HESSIAN_EIGEN: dict[int, tuple] = {}


def output_fisher_eigen(run: TrainedDigits) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda (D,) ascending, Q (D, D)) of the output Fisher F, the KL's exact Hessian at the anchor on
    the training inputs; computed once per network (minutes at D = 4,810) for both full-Hessian rows."""
    cached = _HESSIAN_EIGEN.get(id(run.model))
    if cached is None or cached[0] is not run.model:
        layout = ParameterLayout(run.model.named_parameters())
        cached = (run.model, exact_curvature("hessian-eigen", run.model, layout, run.x_train))
        _HESSIAN_EIGEN[id(run.model)] = cached
    return cached[1]


def hessian_eigenbasis(run: TrainedDigits, eps: float):
    """The full-Hessian row's preconditioner at ``eps``: P = Q diag(1 / (|lambda|^0.5 + eps)), det P = 1,
    from the one eigendecomposition of ``output_fisher_eigen``, only rescaled for each eps of the sweep."""
    return curvature_preconditioner("hessian-eigen", output_fisher_eigen(run), exponent=0.5, eps=eps)


def paper_code_hessian_diagonal(run: TrainedDigits, eps: float) -> torch.Tensor:
    """The paper's full-Hessian row as its code computes it: a (D,) float64 diagonal, det P = 1.

    The paper's code (basin-volume, ``matrix_preconditioner``) maps a unit row u to u @ (Q diag(p)) =
    diag(p) Q^T u with p_j = 1 / (|lambda_j|^0.5 + eps), lambda ascending (``eigh``): the eigen-coordinates
    are never rotated back by Q. Q^T u is uniform on the sphere when u is, so these directions are
    distributed exactly as diag(p) u: the j-th smallest eigenvalue's scale lands on flat parameter j of
    JAX's ravel order (``flax_ravel_index``), whatever that parameter is. Returned in our layout's order.
    """
    values, _ = output_fisher_eigen(run)
    p = inverse_power_preconditioner(values, exponent=0.5, eps=eps, name="paper-code full-Hessian preconditioner")
    return p[flax_ravel_index(run.model)]


def flax_ravel_index(model: torch.nn.Module) -> torch.Tensor:
    """For each entry of ``ParameterLayout(model)``'s flat vector, its index in the paper's flat vector.

    The paper's MLP is flax ``Dense`` layers named Dense_0, Dense_1, ..., raveled by ``ravel_pytree``:
    layer names in sorted (string) order, in each layer its bias, then its kernel (in, out) row-major,
    i.e. our weight (out, in) transposed. Returns a (D,) int64 tensor; raises for a model whose
    parameters are not exactly those of its ``nn.Linear`` layers.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flax_index, offset = {}, 0
    for name in sorted(f"Dense_{k}" for k in range(len(linears))):
        layer = linears[int(name.split("_")[1])]
        if layer.bias is not None:
            flax_index[id(layer.bias)] = torch.arange(offset, offset + layer.out_features)
            offset += layer.out_features
        kernel = torch.arange(offset, offset + layer.weight.numel()).reshape(layer.in_features, layer.out_features)
        flax_index[id(layer.weight)] = kernel.T  # kernel[i, o] is weight[o, i]
        offset += layer.weight.numel()
    layout = ParameterLayout(model.named_parameters())
    extra = [n for n, p in zip(layout.names, layout.params) if id(p) not in flax_index]
    if extra or offset != layout.dim:
        raise ValueError(
            f"the paper's ravel order is defined for a stack of nn.Linear layers only; parameters {extra} of "
            f"this model are not nn.Linear weights or biases. Use preconditioner 'hessian-eigen' instead"
        )
    return torch.cat([flax_index[id(p)].reshape(-1) for p in layout.params])


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
    run: TrainedDigits,
    method: str,
    *,
    cutoff: float,
    n_samples: int,
    seed: int = DIRECTION_SEED,
    progress: bool = False,
    preconditioner_eps=GOOD_ADAM_EPS,
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
            **method_options(run, method, preconditioner_eps),
        )


Callback = Callable[[str, dict], None] | None


def _measured(run, method, fields, *, label: str, on_run: Callback, keep_estimates: bool = True, **options) -> dict:
    """One ``volume`` estimate (``options``: cutoff, n_samples, seed, preconditioner_eps) as a
    ``record_of`` with ``fields`` in front, reported to ``on_run`` under ``label``."""
    record = record_of(volume(run, method, **options), keep_estimates=keep_estimates, **fields)
    if on_run is not None:
        on_run(label, record)
    return record


def eps_sweep(run, method, *, eps_grid, cutoff, n_samples, label: str, on_run: Callback = None) -> dict:
    """One row of the paper's table for one network: the estimate at each preconditioner eps (isotropic
    has none), and the row's figure, the best max per-direction estimate over eps.

    Returns {"sweep": [record with preconditioner_eps], "best_max", "best_eps", "log_volume_at_best"};
    only the best eps's record keeps its per-direction estimates (for the histograms).
    """
    grid = [None] if method == "isotropic" else list(eps_grid)
    sweep = []
    for eps in grid:
        options = {"cutoff": cutoff, "n_samples": n_samples, "seed": DIRECTION_SEED}
        if eps is not None:
            options["preconditioner_eps"] = eps
        fields = {"method": method, "preconditioner_eps": eps}
        tag = f"{label} {method}" + ("" if eps is None else f" eps={eps:g}")
        sweep.append(_measured(run, method, fields, label=tag, on_run=on_run, **options))
    top = max(sweep, key=lambda r: r["max_estimate"])
    for record in sweep:
        if record is not top:
            record.pop("estimates", None)
    return {
        "sweep": sweep,
        "best_max": top["max_estimate"],
        "best_eps": top["preconditioner_eps"],
        "log_volume_at_best": top["log_volume"],
        "best_log_volume": max(r["log_volume"] for r in sweep),
    }


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": -math.inf, "sd": math.nan, "min": -math.inf, "max": -math.inf, "n": 0}
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "sd": sd, "min": min(finite), "max": max(finite), "n": len(finite)}


def preconditioner_table(
    seeds: Sequence[int],
    *,
    methods: Sequence[str] = METHODS,
    eps_grid: Sequence[float] = EPS_GRID,
    cutoff: float = 1e-2,
    n_samples: int = 3000,
    on_run: Callback = None,
) -> dict:
    """(3) The paper's digits table: for each method the eps sweep on each training seed's network.

    Returns {"rows": {method: {"per_seed": {seed: eps_sweep}, "best_max": spread over seeds,
    "log_volume_at_best": spread}}, "skipped": {method: why}, "ranking": methods best first, ...}.
    A method the library refuses at run time (a size limit, a missing dependency) is skipped with its error.
    """
    rows, skipped = {}, {}
    for method in methods:
        per_seed = {}
        try:
            for seed in seeds:
                run = trained(int(seed))
                sweep_args = {"eps_grid": eps_grid, "cutoff": cutoff, "n_samples": n_samples, "on_run": on_run}
                per_seed[str(seed)] = eps_sweep(run, method, label=f"seed {seed}", **sweep_args)
        except (ValueError, TypeError, RuntimeError, MemoryError) as error:
            skipped[method] = f"{type(error).__name__}: {error}"
            continue
        rows[method] = {
            "per_seed": per_seed,
            "best_max": spread([s["best_max"] for s in per_seed.values()]),
            "log_volume_at_best": spread([s["log_volume_at_best"] for s in per_seed.values()]),
        }
    ranking = sorted(rows, key=lambda m: rows[m]["best_max"]["mean"], reverse=True)
    return {
        "cutoff": cutoff, "eps_grid": list(eps_grid), "n_samples": n_samples, "seeds": [int(s) for s in seeds],
        "direction_seed": DIRECTION_SEED, "rows": rows, "skipped": skipped, "ranking": ranking,
        # What older readers of results.json look for: each method's best figure on the first seed.
        "best": {m: {"best_max_estimate": r["best_max"]["mean"]} for m, r in rows.items()},
    }


def training_trajectory(
    checkpoint_steps: Sequence[int],
    *,
    methods: Sequence[str] = ("isotropic", "adam"),
    cutoff: float = 1e-2,
    n_samples: int = 64,
    seed: int = 0,
    on_run: Callback = None,
) -> dict:
    """(1) Log volume over training: the network (and Adam state) after each of ``checkpoint_steps`` of
    the paper's 400-step schedule. Returns {"series": {method: [record with step, test_accuracy, ...]}}."""
    series = {m: [] for m in methods}
    for step in checkpoint_steps:
        if step < 1:
            raise ValueError(f"checkpoint steps must be >= 1 (Adam has no state before a step), got {step}")
        run = trained(int(seed), 0.0, int(step) if step < PAPER_STEPS else None)
        accuracy = run.accuracy()
        for method in methods:
            fields = {"step": int(step), "method": method, "test_accuracy": accuracy}
            options = {"cutoff": cutoff, "n_samples": n_samples, "keep_estimates": False}
            label = f"training step {step} {method}"
            series[method].append(_measured(run, method, fields, label=label, on_run=on_run, **options))
    return {"cutoff": cutoff, "preconditioner_eps": GOOD_ADAM_EPS, "series": series}


def poisoning(
    *,
    poison_fraction: float = 0.4,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] = ("isotropic", "adam"),
    cutoff: float = 1e-2,
    n_samples: int = 64,
    on_run: Callback = None,
) -> dict:
    """(2) Clean vs label-poisoned training (the paper's recipe), per seed and method.

    Returns {"runs": [record with kind ("clean"/"poisoned"), seed, method, accuracies], "means":
    {method: {"clean": mean log volume, "poisoned": ...}}}.
    """
    runs = []
    for seed in seeds:
        for kind, fraction in (("clean", 0.0), ("poisoned", poison_fraction)):
            run = trained(int(seed), float(fraction))
            fields = {
                "kind": kind, "seed": int(seed), "poison_fraction": fraction,
                "test_accuracy": run.accuracy(), "train_accuracy": run.accuracy(run.x_train, run.y_train),
                "anchor_norm_squared": anchor_norm_squared(run),
            }
            for method in methods:
                options = {"cutoff": cutoff, "n_samples": n_samples}
                label = f"{kind} seed {seed} {method}"
                runs.append(_measured(run, method, {**fields, "method": method}, label=label, on_run=on_run, **options))
    means = {
        m: {
            kind: statistics.fmean(r["log_volume"] for r in runs if r["method"] == m and r["kind"] == kind)
            for kind in ("clean", "poisoned")
        }
        for m in methods
    }
    return {
        "steps": PAPER_STEPS, "cutoff": cutoff, "preconditioner_eps": GOOD_ADAM_EPS,
        "poison_fraction": poison_fraction, "runs": runs, "means": means,
    }


def cutoff_scan(
    *, cutoffs: Sequence[float], n_samples: int = 128, seed: int = 0, method: str = "isotropic", on_run: Callback = None
) -> dict:
    """(4) Log volume against the KL cutoff (the paper scans 1e-6 .. 1e2), with D, D/2 and the prior ceiling.

    Returns {"records": [...], "dim", "half_dim", "quadratic_slope" (fit over cutoffs <= 1e-3),
    "ceiling" = -|theta0|^2 / (2 sigma^2)}.
    """
    run = trained(int(seed))
    records = []
    for cutoff in cutoffs:
        options = {"cutoff": cutoff, "n_samples": n_samples, "keep_estimates": False}
        records.append(_measured(run, method, {"method": method}, label=f"scan cutoff={cutoff:g}", on_run=on_run, **options))
    dim = sum(p.numel() for p in run.model.parameters())
    return {
        "steps": PAPER_STEPS, "method": method, "records": records, "dim": dim, "half_dim": dim / 2,
        "quadratic_slope": quadratic_slope(records), "ceiling": prior_ceiling(run), "sigma": PRIOR_SIGMA,
    }


def reproduce_digits(
    out_dir, *, quick: bool = False, n_samples: int | None = None, seed: int = 0, progress: bool = True
) -> dict:
    """Run the four experiments, write results.json, report.md and the plots into ``out_dir``.

    ``n_samples`` replaces the table's directions per setting (and the other experiments' sizes);
    ``seed`` shifts the training seeds. Returns the results dict (what results.json holds).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = settings(quick)
    config["seed"] = seed
    config["table_seeds"] = [seed + s for s in config["table_seeds"]]
    if n_samples is not None:
        config.update(table_n_samples=n_samples, n_samples=n_samples, scan_n_samples=n_samples)
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
    """The four experiments with ``settings``-shaped ``config``: {"preconditioners", "training",
    "poisoning", "cutoff_scan"}, with one progress bar over all their estimates, and each one's seconds."""
    bar = ProgressBar(planned_runs(config), label="estimates", enabled=progress)

    def on_run(label: str, record: dict) -> None:
        bar.update(1, run=label.replace(" ", "_"), log_volume=record["log_volume"], max=record["max_estimate"])

    seed, cutoff, shared = config["seed"], config["cutoff"], {"n_samples": config["n_samples"], "on_run": on_run}
    plan = {
        "preconditioners": lambda: preconditioner_table(
            config["table_seeds"], methods=config["table_methods"], eps_grid=config["eps_grid"],
            cutoff=cutoff, n_samples=config["table_n_samples"], on_run=on_run,
        ),
        "training": lambda: training_trajectory(
            config["checkpoint_steps"], methods=config["trajectory_methods"], cutoff=cutoff, seed=seed, **shared
        ),
        "poisoning": lambda: poisoning(
            poison_fraction=config["poison_fraction"], seeds=[seed + s for s in config["poison_seeds"]],
            methods=config["poison_methods"], cutoff=cutoff, **shared,
        ),
        "cutoff_scan": lambda: cutoff_scan(
            cutoffs=config["scan_cutoffs"], n_samples=config["scan_n_samples"], seed=seed, on_run=on_run
        ),
    }
    results, seconds = {}, {}
    for name, experiment in plan.items():
        started = time.perf_counter()
        results[name] = experiment()
        seconds[name] = time.perf_counter() - started
    bar.close()
    return {**results, "experiment_seconds": seconds}
