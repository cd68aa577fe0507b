"""The reproduction's report: ``report.md`` (one table per experiment and the comparison with the
paper) and the PNG plots, both from the plain-data results of ``experiments.reproduce_digits``."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from localvol_fast.apps import plots
from localvol_fast.apps.digits import PRIOR_SIGMA
from localvol_fast.apps.reproduce.verdicts import PAPER_NAME, PAPER_PRECONDITIONER_RANKING

DIGITS_DIM = 4810  # the digits MLP's parameter count, for results without a cutoff scan


def _fmt(value: float, digits: int = 6) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return lines


def _interval(record: dict) -> str:
    low, high = record["interval"]
    return f"[{low:.6g}, {high:.6g}]"


def write_report(results: dict, path) -> Path:
    """The markdown report: settings, one table per experiment, and the comparison with the paper."""
    lines = _overview_lines(results)
    sections = (
        ("preconditioners", _preconditioner_lines),
        ("poisoning", _poisoning_lines),
        ("cutoff_scan", _scan_lines),
        ("training", _training_lines),
    )
    for key, section in sections:
        if key in results:
            lines += section(results[key])
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"- `{Path(p).name}`: {what}" for what, p in results["plots"].items()] + [""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _overview_lines(results: dict) -> list[str]:
    """The run's settings and the paper comparison's verdicts."""
    config = results["settings"]
    lines = [
        "# Digits MLP: reproducing the paper's experiments",
        "",
        f"localvol_fast {results['version']}, torch {torch.__version__}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} thread(s); {results['seconds']:.1f} s in all"
        + (" (--quick sizes: small samples, noisy)" if results["quick"] else "")
        + ".",
        "",
        (
            f"Network: 64 -> 64 GELU -> 10 MLP (D = {results.get('dim', DIGITS_DIM):,}), Adam lr 0.05, L2 5e-4, "
            f"{config['steps']} full-batch steps on 1,024 digits. Neighborhood: mean KL(anchor || perturbed) over "
            f"the training inputs <= eps. Measure: N(0, sigma^2 I), sigma = {PRIOR_SIGMA:.6g}. "
            f"{config['n_samples']} directions per estimate (cutoff scan: {config['scan_n_samples']}). "
            "Log volumes in nats (log-mean-exp of per-direction estimates, bootstrap 95% interval); ESS is the "
            "effective sample size of the importance weights (1 means one direction carries the estimate)."
        ),
        "",
        "## Comparison with the paper",
        "",
    ]
    for f in results["paper_comparison"]:
        lines += [f"- **{f['verdict'].upper()}** - {f['claim']}.", f"  - ours: {f['ours']}.", f"  - {f['detail']}"]
    return lines + [""]


def _preconditioner_lines(comp: dict) -> list[str]:
    lines = ["## Isotropic vs Adam vs Fisher (eps sweep)", ""]
    header = ["eps"] + [f"{m} log vol" for m in comp["sweep"]] + [f"{m} max" for m in comp["sweep"]]
    rows = [
        [f"{cutoff:g}"]
        + [f"{comp['sweep'][m][k]['log_volume']:.1f}" for m in comp["sweep"]]
        + [f"{comp['sweep'][m][k]['max_estimate']:.1f}" for m in comp["sweep"]]
        for k, cutoff in enumerate(comp["cutoffs"])
    ]
    lines += _table(header, rows) + [""]
    rows = [
        [
            m,
            f"{b['best_max_estimate']:.1f}",
            f"{b['at_cutoff']:g}",
            PAPER_NAME.get(m, "(not in the paper)"),
            _fmt(PAPER_PRECONDITIONER_RANKING.get(PAPER_NAME.get(m, "").split(" / ")[0], math.nan)),
        ]
        for m, b in ((m, comp["best"][m]) for m in comp["ranking"])
    ]
    lines += ["Best max log-estimate over the sweep (the paper's figure):", ""]
    lines += _table(["method", "best max (nats)", "at eps", "paper's row", "paper (nats)"], rows) + [""]
    paper = ", ".join(f"{k} {v:.0f}" for k, v in PAPER_PRECONDITIONER_RANKING.items())
    return lines + [f"Paper: {paper} nats.", ""]


def _poisoning_lines(poison: dict) -> list[str]:
    rows = [
        [
            r["kind"],
            r["seed"],
            r["method"],
            f"{r['train_accuracy']:.3f}",
            f"{r['test_accuracy']:.3f}",
            f"{r['log_volume']:.1f}",
            _interval(r),
            f"{r['effective_sample_size']:.3g}",
        ]
        for r in poison["runs"]
    ]
    header = ["training", "seed", "method", "train acc.", "test acc.", "log vol (nats)", "95% interval", "ESS"]
    title = f"## Clean vs {poison['poison_fraction']:.0%} label-poisoned training (eps {poison['cutoff']:g})"
    return [title, ""] + _table(header, rows) + [""]


def _scan_lines(scan: dict) -> list[str]:
    rows = [
        [
            f"{r['cutoff']:g}",
            f"{r['log_volume']:.1f}",
            f"{r['log10_volume']:.1f}",
            _interval(r),
            f"{r['evals_per_direction']:.2g}",
            ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items())),
        ]
        for r in scan["records"]
    ]
    title = f"## Cutoff scan ({scan['method']}, D/2 = {scan['half_dim']:.0f}, prior ceiling {scan['ceiling']:.1f} nats)"
    header = ["eps", "log vol (nats)", "log10", "95% interval", "evals/dir", "directions"]
    return [title, ""] + _table(header, rows) + [""]


def _training_lines(traj: dict) -> list[str]:
    methods = list(traj["series"])
    first = traj["series"][methods[0]]
    rows = [
        [r["step"], f"{r['test_accuracy']:.3f}"] + [f"{traj['series'][m][k]['log_volume']:.1f}" for m in methods]
        for k, r in enumerate(first)
    ]
    header = ["step", "test acc."] + [f"{m} log vol (nats)" for m in methods]
    return [f"## Volume over training (eps {traj['cutoff']:g})", ""] + _table(header, rows) + [""]


def write_plots(results: dict, out: Path) -> dict:
    """The PNG plots of every experiment in ``results``: {what the plot shows: its path}."""
    made = {}
    if "training" in results:
        made["log volume over training checkpoints"] = str(
            plots.plot_volume_over_training(
                results["training"]["series"],
                out / "training.png",
                title=f"Digits MLP: log volume over training (eps {results['training']['cutoff']:g})",
            )
        )
    if "cutoff_scan" in results:
        scan = results["cutoff_scan"]
        made["log volume against eps, with slope D/2 and the prior ceiling"] = str(
            plots.plot_volume_vs_cutoff(
                {scan["method"]: scan["records"]},
                out / "cutoff_scan.png",
                dim=scan["dim"],
                ceiling=scan["ceiling"],
                title=f"Digits MLP: log volume vs cutoff (D = {scan['dim']:,})",
            )
        )
    if "preconditioners" in results:
        made.update(_preconditioner_plots(results, out))
    if "poisoning" in results:
        made["clean vs poisoned per-direction estimates"] = str(_poisoning_plot(results["poisoning"], out))
    return made


def _preconditioner_plots(results: dict, out: Path) -> dict:
    comp = results["preconditioners"]
    made = {
        "log volume against eps per direction distribution": str(
            plots.plot_volume_vs_cutoff(
                comp["sweep"],
                out / "preconditioners.png",
                dim=results.get("dim", DIGITS_DIM),
                ceiling=results.get("cutoff_scan", {}).get("ceiling"),
                title="Digits MLP: isotropic vs preconditioned directions",
            )
        )
    }
    cutoff = results["settings"]["cutoff"]
    at_main = {m: r for m, records in comp["sweep"].items() for r in records if abs(r["cutoff"] - cutoff) <= 1e-12}
    if at_main:
        made[f"per-direction estimates at eps {cutoff:g}"] = str(
            plots.plot_estimate_histograms(
                at_main, out / "histograms.png", title=f"Per-direction log estimates, eps = {cutoff:g}"
            )
        )
    return made


def _poisoning_plot(poison: dict, out: Path) -> Path:
    """Clean against poisoned per-direction estimates of the first seed's isotropic runs."""
    first_seed = poison["runs"][0]["seed"]
    chosen = {
        f"{r['kind']} ({r['method']})": r
        for r in poison["runs"]
        if r["seed"] == first_seed and r["method"] == "isotropic"
    }
    return plots.plot_estimate_histograms(
        chosen,
        out / "poisoning.png",
        overlay=True,
        title=f"Clean vs {poison['poison_fraction']:.0%} poisoned labels, eps = {poison['cutoff']:g}",
    )
