"""The comparison with the paper: each of its digits claims, our comparable figure and a verdict.

``paper_comparison(results)`` reads what ``experiments.reproduce_digits`` measured (plain data) and
returns one finding per claim: {"claim", "ours", "verdict" ("agrees", "disagrees" or "partly"),
"detail"}. Nothing here runs an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from localvol_fast.core.search import UNBOUNDED

# The paper's digits figures (MATH.md): best max log-estimate over an eps sweep, nats.
PAPER_PRECONDITIONER_RANKING = {
    "diag(H)": -6578.0,
    "HesScale": -6599.0,
    "Adam second moment": -7021.0,
    "Adam first moment": -7705.0,
    "full Hessian": -9381.0,
}
# Which of our methods stands in for which of the paper's rows.
PAPER_NAME = {
    "adam": "Adam second moment",
    "adam-m1": "Adam first moment",
    "fisher": "diag(H) / HesScale (diag. curvature)",
}



def quadratic_slope(records: Sequence[dict], max_cutoff: float = 1e-3) -> float:
    """Least-squares slope of log volume against ln eps over cutoffs <= ``max_cutoff`` (nan if < 2)."""
    points = [(math.log(r["cutoff"]), r["log_volume"]) for r in records if r["cutoff"] <= max_cutoff]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if len(points) < 2:
        return math.nan
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _ranking_finding(comparison: dict) -> dict:
    """The paper's ranking of preconditioners by best max log-estimate, against ours."""
    best = comparison["best"]
    ours = {m: best[m]["best_max_estimate"] for m in best}
    in_paper = [m for m in comparison["ranking"] if m in PAPER_NAME]
    paper = {m: PAPER_PRECONDITIONER_RANKING[PAPER_NAME[m].split(" / ")[0]] for m in in_paper}
    checks = []
    if "adam" in ours and "adam-m1" in ours:
        checks.append(("Adam second moment above Adam first moment", ours["adam"] > ours["adam-m1"]))
    if "fisher" in ours and "adam" in ours:
        checks.append(("diagonal curvature (Fisher) above Adam second moment", ours["fisher"] > ours["adam"]))
    ordering_ok = all(ok for _, ok in checks)
    # "Close" to the paper: within 15% of the paper's figure for the row ours stands in for.
    magnitudes_ok = all(abs(ours[m] - paper[m]) <= 0.15 * abs(paper[m]) for m in in_paper)
    detail = (
        "ordering: "
        + (", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks) or "not checked")
        + ". Magnitudes: "
        + ", ".join(f"{m} {ours[m] - paper[m]:+.0f} nats from the paper's {PAPER_NAME[m]}" for m in in_paper)
        + ". Not computed here: diag(H), HesScale and the full Hessian (the estimator takes diagonal "
        "preconditioners; the Fisher diagonal stands in for diagonal curvature)."
    )
    top = max(best, key=lambda m: best[m]["best_max_estimate"])
    if best[top]["at_cutoff"] == max(comparison["cutoffs"]):
        detail += (
            f" The best figure ({top}) is reached at the largest eps of the sweep, where the volume saturates near the "
            "prior ceiling for every direction distribution whose rays carry prior mass; the paper's figures lie "
            "far below our ceiling, so its sweep, neighborhood or network differ from ours in a way MATH.md "
            "does not pin down: compare orderings, not levels."
        )
    return {
        "claim": "Preconditioners ranked by best max log-estimate over an eps sweep: diag(H) -6578, HesScale "
        "-6599, Adam second moment -7021, Adam first moment -7705, full Hessian -9381 nats",
        "ours": "; ".join(f"{m} {ours[m]:.0f} (at eps {best[m]['at_cutoff']:g})" for m in comparison["ranking"]),
        "verdict": {(True, True): "agrees", (False, False): "disagrees"}.get((ordering_ok, magnitudes_ok), "partly"),
        "detail": detail,
    }


def _importance_sampling_finding(comparison: dict, main_cutoff: float) -> dict | None:
    """Preconditioned directions against isotropic ones at the main eps (None without both)."""
    at_main = {
        m: r["log_volume"]
        for m, records in comparison["sweep"].items()
        for r in records
        if math.isclose(r["cutoff"], main_cutoff, rel_tol=1e-9)
    }
    if "isotropic" not in at_main or len(at_main) < 2:
        return None
    above = [m for m in at_main if m != "isotropic" and at_main[m] > at_main["isotropic"]]
    below = [m for m in at_main if m != "isotropic" and m not in above]
    return {
        "claim": "Importance-sampled (preconditioned) directions give larger estimates than isotropic ones",
        "ours": ", ".join(f"{m} {v:.0f}" for m, v in sorted(at_main.items(), key=lambda kv: -kv[1]))
        + f" nats at eps {main_cutoff:g}",
        "verdict": "agrees" if not below else ("partly" if above else "disagrees"),
        "detail": f"above isotropic: {', '.join(above) or 'none'}; below: {', '.join(below) or 'none'}. "
        "The paper reports the gain for Pythia-31m (Adam, +2e7 orders of magnitude). On the digits MLP "
        "many parameters barely move the output (weights of always-blank pixels, dead units): Adam's and "
        "the Fisher's diagonals are ~0 there, p_i ~ 1/eps_p is huge, and most preconditioned directions "
        "run along them and never leave the neighborhood, paying -D log|P u| in the importance weight.",
    }


def _higher_methods(comparison: dict, max_cutoff: float = 1e-3) -> list[str]:
    """Methods whose estimate is above the isotropic one at every swept eps <= max_cutoff."""
    sweep = comparison["sweep"]
    if "isotropic" not in sweep:
        return []
    base = {r["cutoff"]: r["log_volume"] for r in sweep["isotropic"] if r["cutoff"] <= max_cutoff}
    higher = []
    for m, records in sweep.items():
        mine = {r["cutoff"]: r["log_volume"] for r in records if r["cutoff"] in base}
        if m != "isotropic" and mine and len(mine) == len(base) and all(mine[c] > base[c] for c in base):
            higher.append(m)
    return higher


def _slope_verdict(ratio: float, comparison: dict | None, half: float) -> str:
    if not (math.isfinite(ratio) and abs(ratio - 1) < 0.2):
        return "disagrees"
    # Estimates are lower-bound-like: a method above isotropic at every small eps is closer to the truth.
    if comparison:
        for m in _higher_methods(comparison):
            slope = quadratic_slope(comparison["sweep"][m])
            if math.isfinite(slope) and abs(slope / half - 1) >= 0.2:
                return "partly"
    return "agrees"


def _other_slopes(comparison: dict | None, half: float) -> str:
    if not comparison:
        return ""
    slopes = {m: quadratic_slope(records) for m, records in comparison["sweep"].items() if m != "isotropic"}
    slopes = {m: v for m, v in slopes.items() if math.isfinite(v)}
    if not slopes:
        return ""
    return (
        ". Other direction distributions find other slopes over eps <= 1e-3: "
        + ", ".join(f"{m} {v:.0f} ({v / half:.2f} D/2)" for m, v in slopes.items())
        + ". Above isotropic at every eps <= 1e-3 (so closer to the true volume, the estimates being "
        f"lower-bound-like): {', '.join(_higher_methods(comparison)) or 'none'}. Isotropic directions all see "
        "about the same quadratic cost, so their estimate follows (D/2) log eps by construction; a direction "
        "distribution that finds the flat directions (Fisher ~0, where only the prior limits the ray) grows more "
        "slowly and sits higher: at these eps the volume itself is not in the quadratic regime"
    )


def paper_comparison(results: dict) -> list[dict]:
    """Each paper claim with our comparable figure and a verdict: "agrees", "disagrees" or "partly"."""
    findings = []
    comparison = results.get("preconditioners")
    if comparison:
        findings.append(_ranking_finding(comparison))
        sampling = _importance_sampling_finding(comparison, results["settings"]["cutoff"])
        findings += [sampling] if sampling else []
    if results.get("poisoning"):
        findings.append(_poisoning_finding(results["poisoning"]))
    if results.get("cutoff_scan"):
        findings += [_slope_finding(results["cutoff_scan"], comparison), _ceiling_finding(results["cutoff_scan"])]
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
        + f" nats (mean over {len({r['seed'] for r in poison['runs']})} seed(s), eps {poison['cutoff']:g})",
        "verdict": verdict,
        "detail": "smaller for: "
        + ", ".join(m for m, ok in smaller.items() if ok)
        + "; not smaller for: "
        + (", ".join(m for m, ok in smaller.items() if not ok) or "none"),
    }


def _slope_finding(scan: dict, comparison: dict | None) -> dict:
    slope, half = scan["quadratic_slope"], scan["half_dim"]
    ratio = slope / half if math.isfinite(slope) else math.nan
    return {
        "claim": "Volume grows roughly like (D/2) log eps in the quadratic regime",
        "ours": f"fitted slope {slope:.0f} nats per unit ln eps over eps <= 1e-3, D/2 = {half:.0f} (ratio {ratio:.3f})",
        "verdict": _slope_verdict(ratio, comparison, half),
        "detail": f"{scan['method']} directions" + _other_slopes(comparison, half),
    }


def _ceiling_finding(scan: dict) -> dict:
    top = max(scan["records"], key=lambda r: r["cutoff"])
    ceiling = scan["ceiling"]
    gap = top["log_volume"] - ceiling
    return {
        "claim": "At large eps the volume saturates at the prior's ceiling exp(-|theta0|^2 / (2 sigma^2))",
        "ours": f"log volume {top['log_volume']:.1f} nats at eps {top['cutoff']:g} vs ceiling {ceiling:.1f} nats "
        f"({top['status'].get(UNBOUNDED, 0)} of {top['n_samples']} directions never reach eps)",
        "verdict": "agrees" if abs(gap) <= max(0.5 * abs(ceiling), 50.0) else "disagrees",
        "detail": f"difference {gap:+.1f} nats. A ray that never reaches eps integrates the whole Gaussian along "
        "it, about exp(-|theta0|^2/(2 sigma^2)) for a typical direction; the exact measure of the whole space "
        "is 1 (0 nats), reached only through rare directions pointing back towards the origin.",
    }


TRAJECTORY_TOLERANCE = 300.0  # nats: wiggles smaller than this are not counted against a trend


def _trajectory_finding(method: str, records: Sequence[dict]) -> dict:
    # Points where most directions never reach eps measure the preconditioner, not the volume: the
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
            f"; at steps {degenerate} most directions never reach eps (the preconditioner sends them along "
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
