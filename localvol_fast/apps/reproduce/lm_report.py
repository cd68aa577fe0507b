"""The language-model reproduction's verdicts, ``report.md`` and PNG plots, from the plain-data results of
``lm.reproduce_lm`` (nothing here runs an estimate or trains).

``findings(results)`` gives one entry per paper finding: {"claim", "paper", "ours", "verdict"
("agrees", "partly" or "disagrees"), "detail"}, with the rule behind each verdict in its detail.
Volumes are natural-log volumes (nats); "orders" are log10 = nats / ln 10.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from localvol_fast.apps import plots
from localvol_fast.core.search import UNBOUNDED

LN10 = math.log(10.0)
# The paper's Pythia-31m figures (MATH.md, "What the paper reports"): log10 volumes, isotropic unless said.
PAPER = {
    "dim": 30_494_720, "iso_log10": -3.817e8, "adam_log10": -3.622e8,
    "peak_step": 128, "peak_log10": -2.6e7, "final_step": 143_000, "final_log10": -3.8e8,
}
PAPER_GAIN_LOG10 = PAPER["adam_log10"] - PAPER["iso_log10"]  # about 1.95e7 orders
PAPER_GAIN_PER_PARAMETER = PAPER_GAIN_LOG10 / PAPER["dim"]  # about 0.64 orders per parameter
# "A large margin": a per-parameter gain of at least this fraction of the paper's.
LARGE_FRACTION = 0.1
SLOPE_AGREES, SLOPE_PARTLY = 0.1, 0.5  # |slope / (D/2) - 1| at most this for "agrees" / "partly"
CEILING_CLOSE = 0.05  # log V at the largest cutoff within this fraction of |ceiling| counts as at the ceiling


def trajectory_finding(method: str, records: Sequence[dict], steps: int) -> dict:
    """Rise to an interior peak, then a steady fall. A difference counts when the bootstrap 95% intervals
    of the two points do not overlap; "steady" means no significant climb between consecutive points after
    the peak."""
    values = [r["log_volume"] for r in records]
    low = [r["interval"][0] for r in records]
    high = [r["interval"][1] for r in records]
    grid = [r["step"] for r in records]
    peak = max(range(len(values)), key=values.__getitem__)
    rises = peak > 0 and low[peak] > high[0]
    falls = peak < len(values) - 1 and low[peak] > high[-1]
    climbs = [grid[k] for k in range(peak + 1, len(values)) if low[k] > high[k - 1]]
    if rises and falls:
        verdict = "agrees" if not climbs else "partly"
    else:
        verdict = "partly" if rises or falls else "disagrees"
    detail = (
        f"peak at step {grid[peak]} of {steps} ({100 * grid[peak] / steps:.3g}% of training; the paper's at "
        f"{PAPER['peak_step']} of {PAPER['final_step']:,}, {100 * PAPER['peak_step'] / PAPER['final_step']:.2g}%, "
        f"inside its 1% warmup). Rise from step {grid[0]} significant: {'yes' if rises else 'no'}; fall to the last "
        f"step significant: {'yes' if falls else 'no'}; significant climbs after the peak at steps {climbs or 'none'}. "
        "Curve (step: nats): " + ", ".join(f"{s}: {v:.6g}" for s, v in zip(grid, values))
    )
    return {
        "claim": f"Volume rises early in training, then falls steadily ({method} directions)",
        "paper": f"Pythia-31m: rises for the first ~{PAPER['peak_step']} steps, then falls steadily "
        f"(log10 {PAPER['peak_log10']:.2g} at step {PAPER['peak_step']} to {PAPER['final_log10']:.2g} at {PAPER['final_step']:,})",
        "ours": f"step {grid[0]}: {values[0]:.6g}, peak {values[peak]:.6g} at step {grid[peak]}, "
        f"last (step {grid[-1]}): {values[-1]:.6g} nats",
        "verdict": verdict,
        "detail": detail,
    }


def gain_finding(gains: Sequence[dict], dim: int) -> dict:
    """Adam over isotropic at the last checkpoint, the model the paper's figure is for. "agrees": Adam's
    bootstrap interval lies above isotropic's and the per-parameter gain is at least ``LARGE_FRACTION`` of
    the paper's; "partly": separated but smaller; "disagrees": not separated (or negative). The detail
    lists the earlier checkpoints where the intervals overlap."""
    last = gains[-1]
    large = last["per_parameter_log10"] >= LARGE_FRACTION * PAPER_GAIN_PER_PARAMETER
    if last["separated"] and last["nats"] > 0:
        verdict = "agrees" if large else "partly"
    else:
        verdict = "disagrees"
    not_separated = [g["step"] for g in gains if not g["separated"]]
    detail = (
        f"Gain = log V_adam - log V_iso. Last checkpoint: {last['nats']:.6g} nats = {last['log10']:.4g} orders, "
        f"{last['per_parameter_log10']:.3g} orders per parameter (paper: {PAPER_GAIN_PER_PARAMETER:.3g} at D = "
        f"{PAPER['dim']:,}), {100 * last['relative']:.3g}% of |log V_iso| (paper: "
        f"{100 * PAPER_GAIN_LOG10 / abs(PAPER['iso_log10']):.3g}%). Intervals not separated at steps: "
        f"{not_separated or 'none'}. 'Large' here means at least {LARGE_FRACTION:g} x the paper's per-parameter gain. "
        "Per step (step: nats): " + ", ".join(f"{g['step']}: {g['nats']:.4g}" for g in gains)
    )
    return {
        "claim": "Adam-preconditioned directions (eps 1e-2) beat isotropic ones by a large margin",
        "paper": f"Pythia-31m, eps 1e-2: log10 {PAPER['iso_log10']:.4g} (isotropic) vs {PAPER['adam_log10']:.4g} "
        f"(Adam), a gain of {PAPER_GAIN_LOG10:.3g} orders",
        "ours": f"{last['nats']:.6g} nats = {last['log10']:.4g} orders at step {last['step']} (D = {dim:,})",
        "verdict": verdict,
        "detail": detail,
    }


def slope_finding(method: str, scan: dict, half_dim: float) -> dict:
    """The fitted slope of log V against ln eps (cutoffs <= the fit's limit) against D/2."""
    slope = scan["slope"]
    ratio = slope / half_dim if math.isfinite(slope) else math.nan
    off = abs(ratio - 1) if math.isfinite(ratio) else math.inf
    verdict = "agrees" if off <= SLOPE_AGREES else "partly" if off <= SLOPE_PARTLY else "disagrees"
    local = ", ".join(f"{p['from']:g}->{p['to']:g}: {p['slope'] / half_dim:.3g}" for p in scan["local_slopes"])
    return {
        "claim": f"Volume grows with the cutoff like (D/2) ln eps ({method} directions)",
        "paper": "slope D/2 per unit ln eps in the quadratic regime, saturating at large eps",
        "ours": f"slope {slope:.6g} nats per unit ln eps = {ratio:.4g} x D/2 (fit over {scan['fit_points']} cutoffs "
        f"<= {scan['fit_max_cutoff']:g})",
        "verdict": verdict,
        "detail": f"agrees within {SLOPE_AGREES:.0%} of D/2, partly within {SLOPE_PARTLY:.0%}. Local slopes / (D/2) "
        f"between neighbouring cutoffs: {local}.",
    }


def ceiling_finding(method: str, scan: dict, half_dim: float, ceiling: float) -> dict:
    """At the largest cutoff: the local slope below half of D/2 (saturating) and log V within
    ``CEILING_CLOSE`` of the prior's ceiling -|theta0|^2 / (2 sigma^2); "agrees" both, "partly" one."""
    top = max(scan["records"], key=lambda r: r["cutoff"])
    last_slope = scan["local_slopes"][-1]["slope"] / half_dim if scan["local_slopes"] else math.nan
    flattening = math.isfinite(last_slope) and last_slope < 0.5
    close = abs(top["log_volume"] - ceiling) <= CEILING_CLOSE * abs(ceiling)
    verdict = "agrees" if flattening and close else "partly" if flattening or close else "disagrees"
    return {
        "claim": f"Volume saturates at large cutoffs near the prior's ceiling ({method} directions)",
        "paper": "saturates at exp(-|theta0|^2 / (2 sigma^2))",
        "ours": f"at cutoff {top['cutoff']:g}: {top['log_volume']:.6g} nats vs ceiling {ceiling:.6g}; last local "
        f"slope {last_slope:.3g} x D/2",
        "verdict": verdict,
        "detail": f"agrees when the last local slope is under 0.5 x D/2 and log V is within {CEILING_CLOSE:.0%} of "
        f"the ceiling; partly when one holds. Directions crossing eps at cutoff {top['cutoff']:g}: "
        f"{top['n_samples'] - top['status'].get(UNBOUNDED, 0)}/{top['n_samples']}.",
    }


def findings(results: dict) -> list[dict]:
    """Every paper finding beside ours, with its verdict (see each ``*_finding``)."""
    steps = results["settings"]["steps"]
    out = [trajectory_finding(m, results["series"][m], steps) for m in ("isotropic", "adam")]
    out.append(gain_finding(results["gains"], results["dim"]))
    out += [slope_finding(m, results["cutoff_scan"][m], results["half_dim"]) for m in ("isotropic", "adam")]
    out += [
        ceiling_finding(m, results["cutoff_scan"][m], results["half_dim"], results["ceiling"]) for m in ("isotropic", "adam")
    ]
    return out


def _figure(width: float = 6.4, height: float = 4.4):
    """A (Figure, axes) on the Agg canvas: no pyplot, so a user's interactive backend is never switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def plot_volume_over_steps(series: dict, path: Path, *, dim: int) -> Path:
    """log V (nats) per checkpoint step, one line per method with its bootstrap 95% interval as error bars;
    the step axis is symmetric-log (linear below 1) so that step 0, the initialization, is shown."""
    figure, ax = _figure()
    for method, records in series.items():
        steps = [r["step"] for r in records]
        values = [r["log_volume"] for r in records]
        below = [max(0.0, v - r["interval"][0]) for v, r in zip(values, records)]
        above = [max(0.0, r["interval"][1] - v) for v, r in zip(values, records)]
        ax.errorbar(steps, values, yerr=[below, above], marker="o", markersize=4, capsize=3, label=method)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("training step (symmetric log scale)")
    ax.set_ylabel("log volume (nats)")
    ax.set_title(f"log volume over training (KL cutoff 1e-2, D = {dim:,})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path)
    return Path(path)


def plot_losses(results: dict, path: Path) -> Path:
    """Training-batch loss per update and held-out loss per checkpoint (nats per byte), against the step
    whose weights they were measured at."""
    figure, ax = _figure()
    train = results["train_losses"]
    # Update k's batch loss is measured at the weights after k - 1 updates: plotted at step k - 1.
    ax.plot(range(len(train)), train, linewidth=0.8, alpha=0.7, label="training batch (before its update)")
    held = results["heldout_losses"]
    ax.plot([h["step"] for h in held], [h["heldout_loss"] for h in held], marker="o", label="held-out")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("training step (symmetric log scale)")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path)
    return Path(path)


def write_lm_plots(results: dict, out: Path) -> dict:
    """The PNGs in ``out``; returns {what: path string}."""
    out = Path(out)
    made = {
        "log volume over training (isotropic and Adam)": plot_volume_over_steps(
            results["series"], out / "lm_volume_over_training.png", dim=results["dim"]
        ),
        "log volume vs cutoff at the last checkpoint": plots.plot_volume_vs_cutoff(
            {m: s["records"] for m, s in results["cutoff_scan"].items()}, out / "lm_volume_vs_cutoff.png",
            dim=results["dim"], ceiling=results.get("ceiling"), title=f"log volume vs cutoff at step {results['settings']['steps']} (D = {results['dim']:,})",
        ),
        "training and held-out loss": plot_losses(results, out / "lm_losses.png"),
    }
    return {what: str(path) for what, path in made.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _interval(record: dict) -> str:
    return f"{record['log_volume']:.6g} [{record['interval'][0]:.6g}, {record['interval'][1]:.6g}]"


def _overview(results: dict) -> list[str]:
    config, corpus = results["settings"], results["corpus"]
    return [
        "# The paper's Pythia findings on a small GPT-NeoX trained on the standard library's source",
        "",
        (f"`reproduce_lm(out, quick={results['quick']}, seed={results['seed']})`, localvol_fast {results['version']}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {results['torch_threads']} torch threads."),
        "",
        (f"- Model: GPT-NeoX, {config['layers']} layers, hidden {config['hidden_size']}, {config['heads']} heads, "
        f"byte vocabulary (256), context {config['seq_len']}; D = {results['dim']:,} parameters."),
        (f"- Corpus: {corpus['train_files']} training files ({corpus['train_bytes']:,} bytes) and {corpus['heldout_files']} "
        f"held-out files ({corpus['heldout_bytes']:,} bytes) of `{corpus['root']}`, fingerprint `{corpus['fingerprint'][:16]}`."),
        (f"- Training: {config['steps']} AdamW steps of {config['batch_size']} x {config['seq_len']} bytes, peak lr "
        f"{config['lr']:g}, warmup {max(1, config['steps'] // 16)} steps then cosine to 0.1 x peak."),
        (f"- Measured: KL neighborhood on {config['eval_windows']} held-out windows of {config['seq_len']} bytes, cutoff "
        f"{results['cutoff']:g} nats, {config['n_samples']} directions per estimate, Gaussian prior about the origin "
        f"with sigma = {results['sigma']:.6g} (the RMS of the parameters at initialization, the paper's choice), "
        f"Adam preconditioner eps {results['preconditioner_eps']:g} from the live optimizer state; "
        f"evaluation `{config['evaluation']}`."),
        "",
    ]


def _findings_lines(results: dict) -> list[str]:
    rows = [(f["claim"], f["paper"], f["ours"], f"**{f['verdict']}**") for f in results["findings"]]
    lines = ["## The paper's findings beside ours", ""] + _table(("finding", "paper", "ours", "verdict"), rows) + [""]
    return lines + [f"- **{f['claim']}** ({f['verdict']}): {f['detail']}" for f in results["findings"]] + [""]


def _trajectory_lines(results: dict) -> list[str]:
    adam = {r["step"]: r for r in results["series"]["adam"]}
    gains = {g["step"]: g for g in results["gains"]}
    held = {h["step"]: h["heldout_loss"] for h in results["heldout_losses"]}
    rows = []
    for iso in results["series"]["isotropic"]:
        step = iso["step"]
        a, g = adam.get(step), gains.get(step)
        rows.append((
            step, f"{held[step]:.4f}", _interval(iso), _interval(a) if a else "no Adam state yet",
            f"{g['nats']:.5g}" if g else "", f"{g['log10']:.4g}" if g else "",
            f"{iso['effective_sample_size']:.3g} / {a['effective_sample_size']:.3g}" if a else f"{iso['effective_sample_size']:.3g}",
        ))
    header = ("step", "held-out loss", "log V isotropic [95%]", "log V Adam [95%]", "gain (nats)", "gain (log10)", "ESS iso / Adam")
    note = (
        "Intervals are bootstrap 95% intervals over directions. An effective sample size near 1 means one "
        "direction carries the mean: each figure is then close to the best single direction, a lower-bound-like "
        "estimate (MATH.md, Jensen bias), and the interval's upper end sits just above it."
    )
    return ["## Volume over training (nats)", ""] + _table(header, rows) + ["", note, ""]


def _scan_lines(results: dict) -> list[str]:
    scans = results["cutoff_scan"]
    rows = [
        (f"{c['cutoff']:g}", _interval(c), _reached(c), _interval(a), _reached(a))
        for c, a in zip(scans["isotropic"]["records"], scans["adam"]["records"])
    ]
    lines = [f"## Cutoff scan at step {results['settings']['steps']} (nats)", ""]
    header = ("cutoff", "log V isotropic [95%]", "reached eps", "log V Adam [95%]", "reached eps")
    lines += _table(header, rows) + [""]
    return lines + [
        (f"Fitted slope of log V against ln eps: isotropic {scans['isotropic']['slope']:.6g}, Adam "
        f"{scans['adam']['slope']:.6g}; D/2 = {results['half_dim']:,.1f}. The prior's ceiling "
        f"-|theta0|^2 / (2 sigma^2) = {results['ceiling']:.6g} nats. 'reached eps': directions whose ray "
        "crossed the cutoff (on the others C stays below eps out to the prior's reach, and the whole ray counts)."),
        "",
    ]


def _reached(record: dict) -> str:
    """Directions whose ray crossed the cutoff: all but the "unbounded" ones (C < eps out to the prior's reach)."""
    return f"{record['n_samples'] - record['status'].get(UNBOUNDED, 0)}/{record['n_samples']}"


def _timing_lines(results: dict) -> list[str]:
    timing = results["timing"]
    return [
        "## Time", "",
        f"- This invocation: {results['seconds_this_run']:.1f} s (resumed from step {results['resumed_from_step']})."
        if results["resumed_from_step"] is not None else f"- This invocation: {results['seconds_this_run']:.1f} s.",
        f"- Training (all invocations, up to the last checkpoint): {timing['train_seconds']:.1f} s; estimates over "
        "training (each when it ran): "
        + ", ".join(f"{m} {s:.1f} s" for m, s in timing["estimate_seconds"].items())
        + "; cutoff scans: " + ", ".join(f"{m} {s:.1f} s" for m, s in timing["scan_seconds"].items()) + ".",
        "",
    ]


def write_lm_report(results: dict, path) -> Path:
    """report.md: what ran, the findings with verdicts, the trajectory and scan tables, times, plots."""
    lines = _overview(results) + _findings_lines(results) + _trajectory_lines(results) + _scan_lines(results)
    lines += _timing_lines(results)
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"- `{Path(p).name}`: {what}" for what, p in results["plots"].items()] + [""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
