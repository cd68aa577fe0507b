"""One table comparing our estimator with the reference algorithm, measured in one process.

    python bench/compare.py [--quick | --tiny] [--out bench/results] [--threads 1] [--models a,b]

For each benchmark model (``bench/models.py``) it measures, on the same directions (same seed):
a bare forward pass of the model on its data (median of repeats); the baseline
(``localvol_fast.apps.baseline``: tyche's search, one direction at a time, anchor recomputed each call);
the same search with the anchor cached and without tyche's extra calls ("baseline-lean");
``localvol_fast.estimate`` with ``backend="reference"`` and with the default backend; and, when
``estimate`` accepts a list of cutoffs, a 5-cutoff scan against the single cutoff. It writes
``compare.md`` (the table the README shows) and ``compare.json`` (the same rows, per-direction values,
and the machine: CPU, cores, threads, torch / Python / transformers versions, available backends,
git commit, date, load average).

Definitions used in the table:
- evals/dir: cost evaluations per direction (baseline: including tyche's centre evaluation and repeated
  first probe). fwd/dir: forward passes of the model over the evaluation data per direction; for the
  baseline 2 per evaluation (perturbed + anchor), for ``estimate`` 1 per evaluation (a probe; probes
  batched through vmap count one each), not counting the 2 anchor passes per run.
- s/dir: wall time of the whole call (set-up, anchor, directions, search, estimates) / directions.
- per-eval / bare fwd: (s/dir / evals/dir) / the bare forward pass's time.
- max |d est|: the largest per-direction difference from the baseline's estimate, in nats; both stop
  within |C - eps| <= rtol eps, so up to about D * rtol nats is expected.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from provenance import git  # noqa: E402

import localvol_fast as lv  # noqa: E402
from localvol_fast.apps.baseline import baseline_estimate

REPO = Path(__file__).resolve().parent.parent
MULTI_CUTOFFS = [1e-6, 1e-4, 1e-2, 1.0, 1e2]
SEED = 0
DIRECTIONS = {
    "full": {"digits_mlp": 512, "large_mlp": 64, "tiny_lm": 24},
    "quick": {"digits_mlp": 64, "large_mlp": 12, "tiny_lm": 4},
    "tiny": {"digits_mlp": 8},
}
# One thread by default: this 2-core machine is shared, and with 2 threads a busy neighbour on the other
# core stalls every OpenMP barrier (a GPT-NeoX forward went from 65 ms to ~1 s); 1 thread measured steady.
DEFAULT_THREADS = 1
# Each timed call is repeated this many times and the fastest kept (the values are identical each time):
# the minimum is the estimate least moved by other work on the shared machine. The LM's calls are long.
REPEATS = {"digits_mlp": 3, "large_mlp": 2, "tiny_lm": 2}
GOALS = {"speedup": {"digits_mlp": 8.0, "tiny_lm": 4.0}, "per_eval_over_bare": 1.3, "multi_cutoff": 2.0}


def _load_bench_models():
    """bench/models.py by path (``bench/`` is not a package)."""
    name = "localvol_bench_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("models.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


bench_models = _load_bench_models()


# ----- machine ------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_backends() -> list[str]:
    finder = getattr(lv, "available_backends", None)
    if finder is None:
        from localvol_fast.ops import available_backends as finder
    return list(finder())


def _cpu_pressure() -> str | None:
    """The 'some' line of /proc/pressure/cpu: how much other work competed for the CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def machine_info(threads: int) -> dict:
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        dirty = git("diff", "--no-ext-diff", "--stat", "HEAD", "--") not in ("", None)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "transformers": transformers_version,
        "localvol_fast": getattr(lv, "__version__", None),
        "backends": _available_backends(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_start": _cpu_pressure(),
    }


# ----- measurements ---------------------------------------------------------------------------------
def distribution(values: torch.Tensor) -> dict:
    v = values.double().reshape(-1)
    return {
        "mean": float(v.mean()),
        "median": float(v.median()),
        "p90": float(torch.quantile(v, 0.9)),
        "max": float(v.max()),
    }


def _timed(fn, repeats: int = 1):
    """(result, fastest wall time of ``repeats`` calls, warning messages of the first call)."""
    best, out, messages = math.inf, None, None
    for _ in range(max(1, repeats)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - started)
        if messages is None:
            messages = [str(w.message) for w in caught]
    return out, best, messages


def run_baseline(bm, n: int, lean: bool = False, repeats: int = 1) -> dict:
    def call():
        return baseline_estimate(
            bm.model,
            bm.data,
            cutoff=bm.cutoff,
            n_samples=n,
            sigma=bm.sigma,
            seed=SEED,
            rtol=bench_models.RTOL,
            anchor_cache=lean,
            extra_calls=not lean,
        )

    out, seconds, messages = _timed(call, repeats)
    return {
        "method": "baseline-lean" if lean else "baseline",
        "backend": "-",
        "indices": out["indices"],
        "estimates": out["estimates"],
        "radii": out["radii"],
        "evals": out["evals"],
        "forwards": out["forward_passes"],
        "status": out["status"],
        "seconds": seconds,
        "extra": {"seconds_total_reported": out["seconds_total"], "config": out["config"], "warnings": messages},
    }


def run_estimate(bm, n: int, backend: str, repeats: int = 1) -> dict:
    def call():
        return lv.estimate(
            bm.model,
            bm.data,
            cutoff=bm.cutoff,
            n_samples=n,
            sigma=bm.sigma,
            seed=SEED,
            rtol=bench_models.RTOL,
            progress=False,
            backend=backend,
        )

    result, seconds, messages = _timed(call, repeats)
    info = result.info
    return {
        "method": "ours-default" if backend == "auto" else f"ours-{backend}",
        "backend": result.config.get("backend", backend),
        "indices": result.indices,
        "estimates": result.estimates,
        "radii": result.radii,
        "evals": result.n_evals,
        "forwards": result.n_evals,  # one forward of the model over the data per probe (see docstring)
        "status": list(result.status),
        "seconds": seconds,
        "extra": {
            "seconds_total_reported": info.get("seconds_total", info.get("seconds")),
            "model_forward_calls": info.get("forward_passes"),
            "evaluation": info.get("evaluation"),
            "log_volume": result.log_volume,
            "warnings": messages,
        },
    }


def run_multi_cutoff(bm, n: int, repeats: int = 1) -> dict:
    """A 5-cutoff scan with ``estimate(cutoff=[...])``, or why it is not available."""
    try:
        result, seconds, messages = _timed(
            lambda: lv.estimate(
                bm.model,
                bm.data,
                cutoff=list(MULTI_CUTOFFS),
                n_samples=n,
                sigma=bm.sigma,
                seed=SEED,
                rtol=bench_models.RTOL,
                progress=False,
            ),
            repeats,
        )
    except (TypeError, ValueError) as error:
        return {"available": False, "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    out = {"available": True, "cutoffs": MULTI_CUTOFFS, "seconds": seconds, "warnings": messages}
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    out["per_cutoff"] = [
        {
            "cutoff": getattr(r, "cutoff", None),
            "evals_per_direction": float(r.n_evals.double().mean())
            if isinstance(getattr(r, "n_evals", None), torch.Tensor)
            else None,
            "status_counts": r.status_counts() if hasattr(r, "status_counts") else None,
            "log_volume": getattr(r, "log_volume", None),
        }
        for r in results
    ]
    return out


def summarize(row: dict, model: dict, baseline: dict | None) -> dict:
    n = int(row["evals"].numel())
    s_per_dir = row["seconds"] / n
    evals_per_dir = float(row["evals"].double().mean())
    out = {
        "model": model["name"],
        "dim": model["dim"],
        "method": row["method"],
        "backend": row["backend"],
        "directions": n,
        "evals_per_direction": distribution(row["evals"]),
        "forward_passes_per_direction": distribution(row["forwards"]),
        "seconds_per_direction": s_per_dir,
        "per_eval_over_bare_forward": s_per_dir / evals_per_dir / model["bare_forward_seconds"],
        "status_counts": {s: row["status"].count(s) for s in sorted(set(row["status"]))},
        "d_times_rtol": model["dim"] * bench_models.RTOL,
    }
    if baseline is not None:
        out["speedup_vs_baseline"] = (baseline["seconds"] / int(baseline["evals"].numel())) / s_per_dir
        position = {int(i): k for k, i in enumerate(baseline["indices"].tolist())}
        rows = torch.tensor([position[int(i)] for i in row["indices"].tolist()], dtype=torch.int64)
        difference = (row["estimates"].double() - baseline["estimates"].double()[rows]).abs()
        out["max_abs_estimate_difference"] = float(difference.max())
        out["median_abs_estimate_difference"] = float(difference.median())
    out["extra"] = row["extra"]
    out["per_direction"] = {
        "indices": row["indices"].tolist(),
        "estimates": row["estimates"].tolist(),
        "radii": row["radii"].tolist(),
        "evals": row["evals"].tolist(),
    }
    return out


def measure_model(name: str, n: int, *, warmup: bool, lean: bool, repeats: int = 1) -> dict:
    started = time.perf_counter()
    bm = bench_models.build(name)
    build_seconds = time.perf_counter() - started
    bare_repeats = 7 if name == "tiny_lm" else 31
    model = {
        "name": name,
        "description": bm.description,
        "dim": bm.dim,
        "sigma": bm.sigma,
        "cutoff": bm.cutoff,
        "rtol": bench_models.RTOL,
        "repeats": repeats,
        "notes": bm.notes,
        "build_seconds": build_seconds,
        "bare_forward_seconds": bench_models.bare_forward_seconds(bm, repeats=bare_repeats),
    }
    if warmup:  # one-time costs (lazy imports, kernel loading, allocator growth) out of the timings
        run_estimate(bm, 2, "auto")
        run_estimate(bm, 2, "reference")
        run_baseline(bm, 1)
    print(f"[compare] {name}: D = {bm.dim:,}, bare forward {model['bare_forward_seconds'] * 1e3:.3g} ms", flush=True)
    baseline = run_baseline(bm, n, repeats=repeats)
    rows = [summarize(baseline, model, baseline)]
    if lean:
        rows.append(summarize(run_baseline(bm, n, lean=True, repeats=repeats), model, baseline))
    reference = run_estimate(bm, n, "reference", repeats)
    rows.append(summarize(reference, model, baseline))
    default = run_estimate(bm, n, "auto", repeats)
    rows.append(summarize(default, model, baseline))
    for row in rows:
        print(
            f"[compare]   {row['method']:<14} {row['seconds_per_direction'] * 1e3:9.3f} ms/dir  "
            f"x{row['speedup_vs_baseline']:.2f}  evals/dir {row['evals_per_direction']['mean']:.2f}",
            flush=True,
        )
    multi = run_multi_cutoff(bm, n, repeats)
    if multi["available"]:
        multi["single_cutoff_seconds"] = default["seconds"]
        multi["ratio_to_single_cutoff"] = multi["seconds"] / default["seconds"]
        scan_evals = sum(c["evals_per_direction"] for c in multi["per_cutoff"])
        multi["evals_ratio_to_single_cutoff"] = scan_evals / float(default["evals"].double().mean())
    model["multi_cutoff"] = multi
    return {"model": model, "rows": rows}


# ----- output ---------------------------------------------------------------------------------------
def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.{digits}g}"


def _converged(row) -> str:
    return f"{row['status_counts'].get('converged', 0)}/{row['directions']}"


def markdown(report: dict) -> str:
    m = report["machine"]
    load_start = _fmt(m["load_average_start"][0]) if m["load_average_start"] else "-"
    load_end = _fmt(report["load_average_end"][0]) if report["load_average_end"] else "-"
    machine = (
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, "
        f"transformers {m['transformers']}; backends {', '.join(m['backends'])}; commit "
        f"{(m['git_commit'] or 'unknown')[:10]}{' (with local changes)' if m['git_dirty'] else ''}; {m['date']}; "
        f"mode {report['mode']}; load average {load_start} -> {load_end} (the machine is shared: other work on it "
        "moves every timing; the ratios come from one run)."
    )
    setting = (
        f"Cutoff eps = {report['cutoff']:g} nats, rtol = {report['rtol']:g}, Gaussian measure, isotropic directions, "
        "the same directions (seed 0) for every method. baseline = tyche's search re-implemented "
        "(`localvol_fast/apps/baseline.py`: one direction at a time, doubling + bisection, anchor forward in every "
        "evaluation, centre evaluation and repeated first probe); baseline-lean = the same search with the "
        "anchor cached and without those two extra calls."
    )
    header = (
        "| model | D | method | backend | dirs | fwd/dir mean | median | p90 | max | evals/dir | ms/dir | "
        "speedup vs baseline | per-eval / bare fwd | max \\|d est\\| (nats) | D*rtol | converged |"
    )
    rule = "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = ["# Speed: localvol_fast vs the reference algorithm", "", machine, "", setting, "", header, rule]
    for entry in report["models"]:
        for row in entry["rows"]:
            f = row["forward_passes_per_direction"]
            lines.append(
                f"| {row['model']} | {row['dim']:,} | {row['method']} | {row['backend']} | {row['directions']} | "
                f"{_fmt(f['mean'])} | {_fmt(f['median'])} | {_fmt(f['p90'])} | {_fmt(f['max'])} | "
                f"{_fmt(row['evals_per_direction']['mean'])} | {_fmt(row['seconds_per_direction'] * 1e3)} | "
                f"{_fmt(row['speedup_vs_baseline'])} | {_fmt(row['per_eval_over_bare_forward'])} | "
                f"{_fmt(row['max_abs_estimate_difference'])} | {_fmt(row['d_times_rtol'])} | {_converged(row)} |"
            )
    lines += [
        "",
        "| model | bare forward (ms) | timed calls per method (fastest kept) | 5-cutoff scan / single cutoff: time | evaluations | evaluations per cutoff |",
        "|---|---:|---:|---|---|---|",
    ]
    for entry in report["models"]:
        model = entry["model"]
        multi = model["multi_cutoff"]
        if multi["available"]:
            scan = f"{multi['ratio_to_single_cutoff']:.3g}x | {multi['evals_ratio_to_single_cutoff']:.3g}x | "
            scan += ", ".join(f"{c['cutoff']:g}: {c['evals_per_direction']:.2f}" for c in multi["per_cutoff"])
        else:
            scan = "not available yet | | "
        bare = _fmt(model["bare_forward_seconds"] * 1e3)
        lines.append(f"| {model['name']} | {bare} | {model.get('repeats', 1)} | {scan} |")
    lines += ["", "Goals (ratios measured in this run; not asserted anywhere):", ""]
    for entry in report["models"]:
        name = entry["model"]["name"]
        default = next(r for r in entry["rows"] if r["method"] == "ours-default")
        goal = GOALS["speedup"].get(name)
        within = default["max_abs_estimate_difference"] <= default["d_times_rtol"]
        parts = [
            f"speedup {default['speedup_vs_baseline']:.3g}x" + (f" (goal >= {goal:g}x)" if goal else ""),
            f"per-eval / bare forward {default['per_eval_over_bare_forward']:.3g} (goal <= {GOALS['per_eval_over_bare']:g})",
            (
                f"fwd/dir {default['forward_passes_per_direction']['mean']:.3g} mean, "
                f"{default['forward_passes_per_direction']['max']:.3g} max"
            ),
            f"estimates within D*rtol of the baseline: {'yes' if within else 'NO'}",
        ]
        multi = entry["model"]["multi_cutoff"]
        if multi["available"]:
            parts.append(
                f"5-cutoff scan {multi['ratio_to_single_cutoff']:.3g}x a single cutoff in time, "
                f"{multi['evals_ratio_to_single_cutoff']:.3g}x in evaluations (goal <= {GOALS['multi_cutoff']:g}x)"
            )
        lines.append(f"- {name}: " + "; ".join(parts))
    legend = (
        "fwd/dir: forward passes of the model over its evaluation data per direction (baseline: 2 per evaluation; "
        "ours: 1 per probe, vmapped probes counted one each, plus 2 anchor passes per run not counted). "
        "ms/dir: wall time of the whole call / directions. per-eval / bare fwd: (ms/dir / evals/dir) / bare forward. "
        "Written by `bench/compare.py`; per-direction values in `compare.json`."
    )
    lines += ["", legend]
    return "\n".join(lines) + "\n"


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer directions: about 1-2 minutes")
    size.add_argument("--tiny", action="store_true", help="the digits MLP on 8 directions only: a smoke test")
    parser.add_argument(
        "--out", default=str(REPO / "bench" / "results"), help="directory for compare.md / compare.json"
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch.set_num_threads (default {DEFAULT_THREADS})"
    )
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(bench_models.BUILDERS))
    parser.add_argument("--directions", type=int, default=None, help="directions per model (overrides the mode's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method, fastest kept")
    parser.add_argument("--no-lean", action="store_true", help="skip the baseline-lean row")
    args = parser.parse_args(argv)

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = dict(DIRECTIONS[mode])
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in bench_models.BUILDERS]
        if unknown:
            parser.error(f"unknown models {unknown}; choose from {list(bench_models.BUILDERS)}")
        plan = {m: plan.get(m, DIRECTIONS["quick"].get(m, 8)) for m in wanted}
    if args.directions is not None:
        plan = {m: args.directions for m in plan}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {
        "mode": mode,
        "cutoff": bench_models.CUTOFF,
        "rtol": bench_models.RTOL,
        "seed": SEED,
        "machine": machine_info(torch.get_num_threads()),
        "models": [],
    }
    for name, n in plan.items():
        repeats = args.repeats or (1 if mode == "tiny" else REPEATS.get(name, 1))
        lean = not (args.no_lean or mode == "tiny")
        report["models"].append(measure_model(name, n, warmup=mode != "tiny", lean=lean, repeats=repeats))
    report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["cpu_pressure_end"] = _cpu_pressure()
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(_jsonable(report), indent=1))
    text = markdown(report)
    (out / "compare.md").write_text(text)
    print(text)
    print(f"[compare] wrote {out / 'compare.md'} and {out / 'compare.json'} in {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main()
