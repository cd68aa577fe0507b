"""The poisoned-CNN experiment's verdicts, report.md and plot (``poisoning_cnn`` runs it).

A run record is a dict with seed, kind ("clean"/"poisoned"), method, train_accuracy, test_accuracy,
log_volume and log10_volume, interval ((low, high) nats, the bootstrap 95% interval over directions),
effective_sample_size, n_samples and status, as ``experiments.record_of`` writes them.
"""

from __future__ import annotations

import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

from localvol_fast.core.statistics import t_quantile

# The paper's ConvNeXt on CIFAR-10 (MATH.md): log10 volumes, isotropic directions.
PAPER = {"dim": 3_388_810, "clean_log10": -6.1e6, "poisoned_log10": -8.1e6}


def method_verdict(clean: dict[int, float], poisoned: dict[int, float]) -> dict:
    """Does poisoned < clean hold? ``clean``, ``poisoned``: {seed: log volume (nats)}; seeds are paired.

    Decision: "holds" when the poisoned network's log volume is below the clean one's on EVERY seed,
    "fails" when it is below on none, else "mixed" ("no data" without a finite pair). Beside it, the mean
    paired difference d = poisoned - clean with its 95% t interval mean +- t(n-1) sd / sqrt(n) over
    seeds, and ``beyond_spread``: that interval lies wholly below 0 (needs two seeds or more).
    """
    seeds = [s for s in clean if s in poisoned and math.isfinite(clean[s]) and math.isfinite(poisoned[s])]
    differences = [poisoned[s] - clean[s] for s in seeds]
    if not differences:
        return {"verdict": "no data", "seeds": [], "differences": [], "poisoned_below_on": 0}
    below = sum(d < 0 for d in differences)
    verdict = "holds" if below == len(differences) else "fails" if below == 0 else "mixed"
    mean = statistics.fmean(differences)
    record = {
        "verdict": verdict, "seeds": seeds, "differences": differences, "poisoned_below_on": below,
        "mean_difference": mean, "clean_mean": statistics.fmean(clean[s] for s in seeds),
        "poisoned_mean": statistics.fmean(poisoned[s] for s in seeds),
    }
    if len(differences) > 1:
        sd = statistics.stdev(differences)
        half = t_quantile(0.95, len(differences) - 1) * sd / math.sqrt(len(differences))
        record.update(sd_difference=sd, difference_interval=[mean - half, mean + half], beyond_spread=mean + half < 0)
    return record


def poisoning_verdicts(runs: Sequence[dict], methods: Sequence[str]) -> dict:
    """{method: ``method_verdict``} from run records, plus how many seeds' bootstrap intervals are
    disjoint (poisoned interval wholly below the clean one)."""
    verdicts = {}
    for method in methods:
        by_kind = {kind: {r["seed"]: r for r in runs if r["method"] == method and r["kind"] == kind} for kind in ("clean", "poisoned")}
        verdict = method_verdict(
            {s: r["log_volume"] for s, r in by_kind["clean"].items()},
            {s: r["log_volume"] for s, r in by_kind["poisoned"].items()},
        )
        verdict["intervals_disjoint_on"] = sum(
            by_kind["poisoned"][s]["interval"][1] < by_kind["clean"][s]["interval"][0] for s in verdict["seeds"]
        )
        verdicts[method] = verdict
    return verdicts


def paper_comparison(verdicts: dict) -> list[dict]:
    """The paper's finding beside ours, one entry per method: {claim, verdict, ours} (the CLI prints them)."""
    entries = []
    for method, v in verdicts.items():
        ours = f"poisoned below clean on {v['poisoned_below_on']} of {len(v['seeds'])} seeds"
        if "difference_interval" in v:
            low, high = v["difference_interval"]
            ours += f"; mean poisoned - clean {v['mean_difference']:.0f} nats, 95% interval [{low:.0f}, {high:.0f}]"
        claim = f"a poisoned, badly generalizing network has a smaller local volume ({method} directions)"
        entries.append({"claim": claim, "verdict": v["verdict"], "ours": ours})
    return entries


def _figure(width: float, height: float, ncols: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the poisoning plot needs matplotlib: pip install 'localvol_fast[demo]'") from error
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # Agg canvas of its own: pyplot's backend is never touched
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def write_plot(runs: Sequence[dict], methods: Sequence[str], path) -> Path:
    """PNG: per method, log volume (nats) per training seed, clean and poisoned side by side, with the
    bootstrap 95% intervals as error bars."""
    figure, axes = _figure(4.2 * len(methods), 3.6, len(methods))
    for ax, method in zip(axes, methods):
        for offset, (kind, color) in zip((-0.1, 0.1), (("clean", "#4c72b0"), ("poisoned", "#c44e52"))):
            points = sorted(
                ((r["seed"], r) for r in runs if r["method"] == method and r["kind"] == kind and math.isfinite(r["log_volume"])),
                key=lambda pair: pair[0],
            )
            seeds, ys = [s for s, _ in points], [r["log_volume"] for _, r in points]
            # Error bars from the bootstrap interval; an infinite end (no finite resample) draws no bar.
            errors = [[r["log_volume"] - r["interval"][0] for _, r in points], [r["interval"][1] - r["log_volume"] for _, r in points]]
            errors = [[e if math.isfinite(e) else 0.0 for e in side] for side in errors]
            ax.errorbar([s + offset for s in seeds], ys, yerr=errors, fmt="o", capsize=3, color=color, label=kind)
        ax.set_title(f"{method} directions")
        ax.set_xlabel("training seed")
        ax.set_ylabel("log volume (nats)")
        ax.set_xticks(sorted({r["seed"] for r in runs}))
        ax.legend()
    figure.suptitle("Small CNN on digits: clean vs label-poisoned (KL <= 1e-2, 95% bootstrap intervals)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _interval_text(record: dict) -> str:
    low, high = record["interval"]
    return f"[{low:.1f}, {high:.1f}]"


def _verdict_lines(verdicts: dict, dim: int) -> list[str]:
    lines = ["## Verdicts: poisoned < clean?", ""]
    for method, v in verdicts.items():
        if v["verdict"] == "no data":
            lines.append(f"- **{method}: NO DATA** (no seed with finite clean and poisoned volumes)")
            continue
        n = len(v["seeds"])
        diffs = ", ".join(f"{d:+.1f}" for d in v["differences"])
        spread = ""
        if "difference_interval" in v:
            low, high = v["difference_interval"]
            spread = f"; mean {v['mean_difference']:+.1f} nats, 95% t interval [{low:.1f}, {high:.1f}] " + (
                "(wholly below 0)" if v["beyond_spread"] else "(reaches 0 or above)"
            )
        lines.append(
            f"- **{method}: {v['verdict'].upper()}** - poisoned below clean on {v['poisoned_below_on']} of {n} seed(s); "
            f"poisoned - clean per seed: {diffs} nats{spread}; bootstrap intervals disjoint on "
            f"{v['intervals_disjoint_on']} of {n}. Mean log10 volume clean {v['clean_mean'] / math.log(10):.1f}, "
            f"poisoned {v['poisoned_mean'] / math.log(10):.1f} (poisoned / clean = {v['poisoned_mean'] / v['clean_mean']:.3g})."
        )
    lines += [
        "",
        "Decision: HOLDS when the poisoned network's log volume is below the clean one's on every training "
        "seed (paired by seed), FAILS when on none, MIXED otherwise. The t interval of the mean paired "
        "difference says whether the gap is beyond the seed-to-seed spread.",
        "",
        "## Beside the paper",
        "",
        f"- Paper (ConvNeXt, CIFAR-10, D = {PAPER['dim']:,}, isotropic): log10 volume clean {PAPER['clean_log10']:.2g}, "
        f"poisoned {PAPER['poisoned_log10']:.2g}; poisoned / clean = {PAPER['poisoned_log10'] / PAPER['clean_log10']:.3g}; "
        f"per parameter {PAPER['clean_log10'] / PAPER['dim']:.3f} vs {PAPER['poisoned_log10'] / PAPER['dim']:.3f}.",
    ]
    iso = verdicts.get("isotropic")
    if iso and iso["verdict"] != "no data":
        clean, poisoned = iso["clean_mean"] / math.log(10), iso["poisoned_mean"] / math.log(10)
        lines.append(
            f"- Ours (small CNN, digits, D = {dim:,}, isotropic, mean over seeds): log10 clean {clean:.4g}, "
            f"poisoned {poisoned:.4g}; poisoned / clean = {poisoned / clean:.3g}; per parameter "
            f"{clean / dim:.3f} vs {poisoned / dim:.3f}. The paper's finding {'holds' if iso['verdict'] == 'holds' else 'does not hold on every seed'} here."
        )
    return lines + [""]


def _run_table(runs: Sequence[dict]) -> list[str]:
    header = ["seed", "kind", "train acc", "test acc", "method", "log volume (nats)", "log10 volume", "95% interval (nats)", "ESS", "evals/dir"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [
            r["seed"], r["kind"], f"{r['train_accuracy']:.3f}", f"{r['test_accuracy']:.3f}", r["method"],
            f"{r['log_volume']:.1f}", f"{r['log10_volume']:.1f}", _interval_text(r),
            f"{r['effective_sample_size']:.2f}", f"{r['evals_per_direction']:.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines + [""]


def _settings_lines(results: dict, dim: int) -> list[str]:
    config, timing = results["settings"], results["evaluation_timing"]
    if timing["n_samples"] is None:
        path_line = (
            f"- Evaluation path: **{timing['fastest']}** (what evaluation=\"auto\" picks for this CNN on this "
            "device), not timed in this run (quick sizes skip it); the default run times vmap, inplace and "
            "sequential on 64 directions and uses the fastest."
        )
    else:
        shown = ", ".join(f"{mode} {s:.2f} s" for mode, s in timing["seconds"].items())
        path_line = (
            f"- Evaluation path, measured (isotropic estimate of {timing['n_samples']} directions on the seed "
            f"{config['seeds'][0]} clean network, wall clock): {shown}; fastest **{timing['fastest']}**, used for "
            f"every run (evaluation=\"auto\" resolves to {timing['auto_resolves_to']} for this CNN on this device)."
        )
    return [
        "## Settings",
        "",
        f"- Network: conv 3x3 1 -> {config['channels'][0]} (pad 1), tanh-GELU, conv 3x3 stride 2 "
        f"{config['channels'][0]} -> {config['channels'][1]} (pad 1), tanh-GELU, linear {config['channels'][1] * 16} -> 10 "
        f"on the 8 x 8 digits images (pixels / 16); D = {dim:,}; weights and biases N(0, 1/fan_in).",
        f"- Training: the paper's digits recipe: {config['steps']} Adam steps (eps 1e-8 inside and outside the "
        "square root, lr 0.05 cosine-decayed to 0), minibatches of 64 over "
        f"{config['steps'] * 64 / 1024:g} reshuffled epochs of the 1,024 training images, loss mean cross-entropy + 0.5 * 5e-4 |theta|^2; test accuracy on the other 773 images.",
        f"- Poisoning: {config['poison_fraction']:.0%} of the training labels replaced by a random different class "
        "(the digits MLP experiment's poisoning); test labels clean. Train accuracy is against the labels trained on.",
        f"- Volume: mean KL(anchor || perturbed) over the 1,024 training inputs <= {config['cutoff']:g}; prior "
        f"N(0, sigma^2 I) about the origin, sigma = {config['sigma']:.6g} = 1/sqrt(5e-4 * 1,024), the prior of the "
        "loss's L2 term (the same as the digits MLP's, so the figures compare); "
        f"{config['n_samples']:,} directions per estimate (seed {config['direction_seed']}); methods "
        f"{', '.join(config['methods'])} (Adam: raw second moment, p = 1/(v^0.5 + {config['adam_eps']:g}), det P = 1).",
        "- Interval: percentile bootstrap over directions. ESS is the effective sample size of the importance "
        "weights: near 1 means one direction carries the estimate and the interval understates the error (the "
        "ray estimator's log is a lower bound in practice, MATH.md).",
        path_line,
        "",
    ]


def write_report(results: dict, runs: Sequence[dict], path) -> Path:
    """report.md: the run table, the verdicts, the paper beside ours, the settings, wall time, versions."""
    dim = runs[0]["dim"] if runs else 0
    lines = [
        "# A poisoned CNN has a smaller local volume? (the paper's ConvNeXt finding on digits)",
        "",
        f"localvol_fast {results['version']}, torch {results['torch']}, {platform.machine()} CPU, "
        f"{results['threads']} thread(s); wall time {results['seconds_spent']:.1f} s"
        + (" (over resumed sessions)" if results.get("resumed") else "")
        + (" (quick sizes: few directions, noisy)" if results["settings"]["quick"] else "") + ".",
        "",
        "## Runs",
        "",
    ]
    lines += _run_table(runs) + _verdict_lines(results["verdicts"], dim) + _settings_lines(results, dim)
    lines += ["## Plot", "", f"- `{Path(results['plot']).name}`: log volume per seed, clean vs poisoned, per method.", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
