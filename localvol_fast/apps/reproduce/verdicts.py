"""The comparison with the paper: each of its digits claims, our comparable figure and a verdict.

``paper_comparison(results)`` reads what ``experiments.reproduce_digits`` measured (plain data) and
returns one finding per claim: {"claim", "ours", "verdict" ("agrees", "disagrees" or "partly"),
"detail"}. Nothing here runs an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from localvol_fast.core.search import UNBOUNDED

# The paper's digits table (MATH.md): best max log-estimate over its preconditioner-eps sweep, nats.
PAPER_PRECONDITIONER_RANKING = {
    "diag(H)": -6578.0,
    "HesScale": -6599.0,
    "Adam second moment": -7021.0,
    "Adam first moment": -7705.0,
    "full Hessian": -9381.0,
}
# Which of our methods is which of the paper's rows.
PAPER_NAME = {
    "isotropic": "isotropic",
    "diag-h": "diag(H)",
    "hesscale": "HesScale",
    "adam": "Adam second moment",
    "adam-m1": "Adam first moment",
    "hessian-eigen": "full Hessian",
    "hessian-paper-code": "full Hessian, as the paper's code applies it",
}
# Our rows that are another reading of one of the paper's rows: {our method: the method whose paper row it is}.
# "hessian-paper-code" is the full-Hessian row computed as the paper's code does (experiments.py).
PAPER_ROW_OF = {"hessian-paper-code": "hessian-eigen"}
# The paper's own code run on its own network (MATH.md): (nats, the preconditioner eps it was reached at).
PAPER_CODE = {
    "adam": (-7021.0, 1e-3),
    "adam-m1": (-7705.0, 1e-3),
    "diag-h": (-6573.0, 1e-2),
    "hessian-eigen": (-9416.0, 1e-1),
    "hessian-paper-code": (-9416.0, 1e-1),
}
# Our figure "matches" the paper's when within this many nats: the seed-to-seed spread of a best-of-3,000
# max measured in MATH.md is 200-330 nats, so a difference under ~2 such spreads is not a difference.
MATCH_TOLERANCE = 500.0


def paper_figure(method: str) -> float:
    """The paper's table figure for one of our methods (nan where the paper has none)."""
    return PAPER_PRECONDITIONER_RANKING.get(PAPER_NAME.get(PAPER_ROW_OF.get(method, method), ""), math.nan)


def quadratic_slope(records: Sequence[dict], max_cutoff: float = 1e-3) -> float:
    """Least-squares slope of log volume against ln(KL cutoff) over cutoffs <= ``max_cutoff`` (nan if < 2)."""
    points = [(math.log(r["cutoff"]), r["log_volume"]) for r in records if r["cutoff"] <= max_cutoff]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if len(points) < 2:
        return math.nan
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _ranking_finding(table: dict) -> dict:
    """The paper's rows (best max over preconditioner eps, mean over training seeds) against its figures and ordering."""
    rows = table["rows"]
    ours = {m: rows[m]["best_max"]["mean"] for m in rows}
    in_paper = [m for m in table["ranking"] if math.isfinite(paper_figure(m))]
    pairs = [
        ("adam", "adam-m1"), ("diag-h", "adam"), ("hesscale", "adam"), ("adam-m1", "hessian-eigen"),
        ("adam-m1", "hessian-paper-code"),
    ]
    checks = [(f"{PAPER_NAME[a]} above {PAPER_NAME[b]}", ours[a] > ours[b]) for a, b in pairs if a in ours and b in ours]
    ordering_ok = all(ok for _, ok in checks)
    close = {m: abs(ours[m] - paper_figure(m)) <= MATCH_TOLERANCE for m in in_paper}
    detail = (
        "ordering: " + (", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks) or "not checked")
        + ". Differences from the paper (ours - paper, mean over seeds): "
        + ", ".join(f"{PAPER_NAME[m]} {ours[m] - paper_figure(m):+.0f}" for m in in_paper)
        + f" nats; within {MATCH_TOLERANCE:.0f} nats (about two seed-to-seed spreads of a best-of-"
        f"{table['n_samples']:,} max) for: {', '.join(PAPER_NAME[m] for m in in_paper if close[m]) or 'none'}."
    )
    missing = [name for m, name in PAPER_NAME.items() if m != "isotropic" and m not in PAPER_ROW_OF and m not in rows]
    if missing:
        detail += " Not run (the library does not offer them yet, or refused them): " + ", ".join(missing) + "."
    magnitudes_ok = bool(in_paper) and all(close.values())
    return {
        "claim": "Preconditioners ranked by best max log-estimate over a preconditioner-eps sweep: diag(H) -6578, HesScale "
        "-6599, Adam second moment -7021, Adam first moment -7705, full Hessian -9381 nats",
        "ours": "; ".join(f"{PAPER_NAME.get(m, m)} {ours[m]:.0f}" for m in table["ranking"]),
        "verdict": {(True, True): "agrees", (False, False): "disagrees"}.get((ordering_ok, magnitudes_ok), "partly"),
        "detail": detail,
    }


def _importance_sampling_finding(table: dict) -> dict | None:
    """Preconditioned rows against isotropic, by the table's figure (None without isotropic)."""
    rows = table["rows"]
    if "isotropic" not in rows or len(rows) < 2:
        return None
    base = rows["isotropic"]["best_max"]["mean"]
    above = [m for m in rows if m != "isotropic" and rows[m]["best_max"]["mean"] > base]
    below = [m for m in rows if m != "isotropic" and m not in above]
    return {
        "claim": "Importance-sampled (preconditioned) directions give larger estimates than isotropic ones",
        "ours": f"isotropic {base:.0f}; " + ", ".join(f"{m} {rows[m]['best_max']['mean']:.0f}" for m in rows if m != "isotropic")
        + f" nats (best max over the preconditioner-eps sweep, KL cutoff {table['cutoff']:g})",
        "verdict": "agrees" if not below else ("partly" if above else "disagrees"),
        "detail": f"above isotropic: {', '.join(above) or 'none'}; below: {', '.join(below) or 'none'}. "
        "At a poor preconditioner eps (1e-5) the preconditioned rows fall far below isotropic: the weights of always-blank "
        "pixels get p ~ 1/eps and take nearly all of |P u|, and -D log|P u| costs thousands of nats.",
    }


def paper_comparison(results: dict) -> list[dict]:
    """Each paper claim with our comparable figure and a verdict: "agrees", "disagrees" or "partly"."""
    findings = []
    table = results.get("preconditioners")
    if table and table["rows"]:
        findings.append(_ranking_finding(table))
        sampling = _importance_sampling_finding(table)
        findings += [sampling] if sampling else []
    if results.get("poisoning"):
        findings.append(_poisoning_finding(results["poisoning"]))
    if results.get("cutoff_scan"):
        findings += [_slope_finding(results["cutoff_scan"]), _ceiling_finding(results["cutoff_scan"])]
    trajectory = results.get("training")
    if trajectory:
        findings += [_trajectory_finding(method, records) for method, records in trajectory["series"].items()]
    return findings


def _poisoning_finding(poison: dict) -> dict:
    means = poison["means"]
    smaller = {m: means[m]["poisoned"] < means[m]["clean"] for m in means}
    verdict = "agrees" if all(smaller.values()) else ("disagrees" if not any(smaller.values()) else "partly")
    return {
        "claim": "A poisoned, badly generalizing network has smaller volume than a clean one",
        "ours": "; ".join(f"{m}: clean {v['clean']:.0f}, poisoned {v['poisoned']:.0f}" for m, v in means.items())
        + f" nats (mean over {len({r['seed'] for r in poison['runs']})} seed(s), KL cutoff {poison['cutoff']:g}, "
        f"preconditioned directions at preconditioner eps {poison['preconditioner_eps']:g})",
        "verdict": verdict,
        "detail": "smaller for: "
        + ", ".join(m for m, ok in smaller.items() if ok)
        + "; not smaller for: "
        + (", ".join(m for m, ok in smaller.items() if not ok) or "none"),
    }


def _slope_finding(scan: dict) -> dict:
    slope, half = scan["quadratic_slope"], scan["half_dim"]
    ratio = slope / half if math.isfinite(slope) else math.nan
    return {
        "claim": "Volume grows roughly like (D/2) log(KL cutoff) in the quadratic regime",
        "ours": f"fitted slope {slope:.0f} nats per unit ln(cutoff) over cutoffs <= 1e-3, D/2 = {half:.0f} "
        f"(ratio {ratio:.3f})",
        "verdict": "agrees" if math.isfinite(ratio) and abs(ratio - 1) < 0.2 else "disagrees",
        "detail": f"{scan['method']} directions. Isotropic directions all see about the same quadratic cost near "
        "the anchor, so their estimate follows (D/2) log(cutoff) while the cutoff is small.",
    }


def _ceiling_finding(scan: dict) -> dict:
    top = max(scan["records"], key=lambda r: r["cutoff"])
    ceiling = scan["ceiling"]
    gap = top["log_volume"] - ceiling
    return {
        "claim": "At a large KL cutoff the volume saturates at the prior's ceiling exp(-|theta0|^2 / (2 sigma^2))",
        "ours": f"log volume {top['log_volume']:.1f} nats at KL cutoff {top['cutoff']:g} vs ceiling {ceiling:.1f} nats "
        f"({top['status'].get(UNBOUNDED, 0)} of {top['n_samples']} directions never reach the cutoff)",
        "verdict": "agrees" if abs(gap) <= max(0.5 * abs(ceiling), 50.0) else "disagrees",
        "detail": f"difference {gap:+.1f} nats. A ray that never reaches the cutoff integrates the whole Gaussian along "
        "it, about exp(-|theta0|^2/(2 sigma^2)) for a typical direction; the exact measure of the whole space "
        "is 1 (0 nats), reached only through rare directions pointing back towards the origin.",
    }


TRAJECTORY_TOLERANCE = 300.0  # nats: wiggles smaller than this are not counted against a trend


def _trajectory_finding(method: str, records: Sequence[dict]) -> dict:
    # Points where most directions never reach the cutoff measure the preconditioner, not the volume: the
    # verdict leaves them out (they stay in the printed curve).
    degenerate = [r["step"] for r in records if r["status"].get(UNBOUNDED, 0) > r["n_samples"] / 2]
    kept = [r for r in records if r["step"] not in degenerate] or list(records)
    values = [r["log_volume"] for r in kept]
    steps = [r["step"] for r in kept]
    peak = max(range(len(values)), key=values.__getitem__)
    tol = TRAJECTORY_TOLERANCE
    rises = values[peak] > values[0] + tol
    falls = values[-1] < values[peak] - tol
    # The paper's curve rises, then falls steadily; count drops before the peak and climbs after it.
    early_dips = [steps[k] for k in range(1, peak + 1) if values[k] < max(values[:k]) - tol]
    late_climbs = [steps[k] for k in range(peak + 1, len(values)) if values[k] > min(values[peak:k]) + tol]
    if rises and falls:
        verdict = "agrees" if not early_dips and not late_climbs else "partly"
    else:
        verdict = "partly" if rises or falls else "disagrees"
    detail = "the paper's curve is Pythia-31m (peak near step 128 of 143,000); ours is the digits MLP"
    detail += "" if rises else f"; no early rise of more than {tol:.0f} nats"
    detail += "" if falls else f"; no later fall of more than {tol:.0f} nats"
    if early_dips:
        detail += f"; it first dips (by more than {TRAJECTORY_TOLERANCE:.0f} nats) at steps {early_dips}"
    if late_climbs:
        detail += f"; after the peak it climbs again at steps {late_climbs}"
    if degenerate:
        detail += (
            f"; at steps {degenerate} most directions never reach the cutoff (the preconditioner sends them along "
            "parameters the output ignores), so those points measure the preconditioner, not the volume, and the "
            "verdict leaves them out"
        )
    detail += (
        ". The whole curve (step: nats): "
        + ", ".join(f"{r['step']}: {r['log_volume']:.0f}" for r in records)
        + ". Each point is a lower-bound-like estimate (ESS ~1): differences of a few hundred nats are within noise."
    )
    return {
        "claim": f"Volume over training rises early, then falls ({method} directions)",
        "ours": f"peak {values[peak]:.0f} nats at step {steps[peak]}; step {records[0]['step']}: "
        f"{records[0]['log_volume']:.0f}, final step {records[-1]['step']}: {records[-1]['log_volume']:.0f}",
        "verdict": verdict,
        "detail": detail,
    }
