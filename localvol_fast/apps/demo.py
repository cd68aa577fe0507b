"""``localvol demo``: train the paper's digits MLP with the paper's recipe and estimate its volume with
three direction distributions (isotropic, Adam second moment, sampled Fisher diagonal), writing
``demo.json`` and ``demo.png``.

The preconditioners' additive eps decides whether they help (MATH.md, "The paper's digits setup"): at
the library's old default 1e-5 the weights of always-blank pixels get p ~ 1e5, take nearly all of |P u|
and cost thousands of nats, so Adam looks worse than isotropic. The demo uses
``preconditioner_eps="auto"``: the eps is chosen on pilot directions of another seed.

``demo.json`` = {"format": "localvol_fast.demo", "version", "settings", "table": [``demo_row`` per
method], "results": {method: ``VolumeResult.to_dict()``}, "seconds"}; ``load_demo_results`` gives the
``VolumeResult``s back.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from localvol_fast import __version__
from localvol_fast.apps.digits import PAPER_STEPS, PRIOR_SIGMA, TrainedDigits
from localvol_fast.apps.plots import plot_estimate_histograms
from localvol_fast.apps.reproduce.experiments import trained, volume
from localvol_fast.core.result import VolumeResult

DEMO_METHODS = ("isotropic", "adam", "fisher")
DEMO_FORMAT = "localvol_fast.demo"
# Without "auto": the best eps of the paper's sweep (MATH.md: Adam 1e-3; diagonal curvature 1e-2).
def demo_eps(method: str):
    """The preconditioner eps the demo uses for ``method``: chosen on pilot directions (None for isotropic)."""
    return None if method == "isotropic" else "auto"


@dataclass
class DemoRun:
    """What one demo made: a result per method, the table's rows, demo.json's document and the files."""

    results: dict[str, VolumeResult]
    rows: list[dict]
    document: dict
    json_path: Path
    png_path: Path


def require_demo_extras() -> None:
    """Fail before any training when the demo's optional dependencies are missing."""
    for module, purpose in (("sklearn", "the digits data"), ("matplotlib", "the plots")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(f"{purpose} need {module}: pip install 'localvol_fast[demo]'") from None


def run_demo(
    out: Path,
    *,
    steps: int = PAPER_STEPS,
    n_samples: int = 128,
    cutoff: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    say: Callable[[str], None] = lambda message: None,
) -> DemoRun:
    """Train (the paper's recipe, at most its 400 steps), estimate with each of ``DEMO_METHODS`` and write
    ``demo.png`` and ``demo.json`` into the existing folder ``out``; ``say`` receives the progress messages."""
    started = time.perf_counter()
    steps = min(int(steps), PAPER_STEPS)  # the paper's schedule is 400 steps; fewer stop it early
    say(f"training the digits MLP (the paper's recipe, {steps} of its {PAPER_STEPS} minibatch steps) ...")
    run = trained(seed, 0.0, steps if steps < PAPER_STEPS else None)
    train_seconds = time.perf_counter() - started
    accuracy = run.accuracy()
    say(f"trained in {train_seconds:.1f} s; test accuracy {accuracy:.3f}")
    results, rows = _estimate_each_method(
        run, n_samples=n_samples, cutoff=cutoff, seed=seed, progress=progress, say=say
    )
    dim = results[DEMO_METHODS[0]].dim
    # Files first: a closed stdout (`localvol demo | head`) must not lose them.
    png = plot_estimate_histograms(
        results,
        out / "demo.png",
        title=f"Digits MLP (D = {dim:,}): per-direction log estimates, eps = {cutoff:g}",
    )
    settings = {
        "steps": steps,
        "n_samples": n_samples,
        "cutoff": cutoff,
        "seed": seed,
        "recipe": "paper",
        "preconditioner_eps": {m: demo_eps(m) for m in DEMO_METHODS if m != "isotropic"},
        "sigma": PRIOR_SIGMA,
        "dim": dim,
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "threads": torch.get_num_threads(),
    }
    document = {
        "format": DEMO_FORMAT,
        "version": __version__,
        "settings": settings,
        "table": rows,
        "results": {m: r.to_dict() for m, r in results.items()},
        "seconds": time.perf_counter() - started,
    }
    path = out / "demo.json"
    path.write_text(json.dumps(document, indent=1))
    return DemoRun(results, rows, document, path, png)


def _estimate_each_method(run: TrainedDigits, *, n_samples, cutoff, seed, progress, say) -> tuple[dict, list[dict]]:
    """({method: VolumeResult}, [demo_row per method]) in ``DEMO_METHODS`` order."""
    results, rows = {}, []
    for k, method in enumerate(DEMO_METHODS, 1):
        eps = demo_eps(method)
        say(f"[{k}/{len(DEMO_METHODS)}] {method} directions" + ("" if eps is None else f" (preconditioner eps {eps})"))
        t0 = time.perf_counter()
        options = {"cutoff": cutoff, "n_samples": n_samples, "seed": seed, "progress": progress}
        results[method] = volume(run, method, preconditioner_eps=eps if eps is not None else 0.0, **options)
        rows.append(demo_row(method, results[method], time.perf_counter() - t0))
    return results, rows


def used_eps(result: VolumeResult):
    """The preconditioner eps a result was estimated with: the auto choice, the fixed value, or None."""
    info = result.info.get("preconditioner") or {}
    choice = info.get("eps_choice")
    return choice["chosen"] if choice else info.get("eps")


def demo_headline(settings: dict) -> str:
    """The line above the demo's table: the network and the estimate's settings."""
    return (
        f"digits MLP (D = {settings['dim']:,}, {settings['steps']} steps, "
        f"test accuracy {settings['test_accuracy']:.3f}): "
        f"KL neighborhood eps = {settings['cutoff']:g}, Gaussian prior sigma = {settings['sigma']:.4g}, "
        f"{settings['n_samples']} directions per method, preconditioner eps "
        + ", ".join(f"{m} {e}" for m, e in settings.get("preconditioner_eps", {}).items())
    )


def demo_row(method: str, result: VolumeResult, seconds: float) -> dict:
    low, high = result.log_volume_interval
    return {
        "method": method,
        "preconditioner_eps": used_eps(result),
        "log_volume": result.log_volume,
        "log10_volume": result.log10_volume,
        "interval": [low, high],
        "effective_sample_size": result.effective_sample_size,
        "evals_per_direction": result.evals_per_direction,
        "seconds": seconds,
    }


def format_table(rows: list[dict]) -> str:
    """The demo's table: method, log volume (nats, log10), 95% interval, ESS, evaluations, seconds."""
    header, body = _table_cells(rows)
    widths = [max(len(h), *(len(row[k]) for row in body)) for k, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in body])


def markdown_table(rows: list[dict]) -> str:
    """The same table in markdown, as the README shows it (tests/apps/test_readme_demo.py parses it)."""
    header, body = _table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the demo's table as strings."""
    header = [
        "method", "eps", "log volume (nats)", "log10 volume", "95% interval (nats)", "ESS", "evals/dir", "seconds"
    ]
    body = [
        [
            r["method"],
            "-" if r.get("preconditioner_eps") is None else f"{r['preconditioner_eps']:g}",
            f"{r['log_volume']:.1f}",
            f"{r['log10_volume']:.1f}",
            f"[{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]",
            f"{r['effective_sample_size']:.3g}",
            f"{r['evals_per_direction']:.2f}",
            f"{r['seconds']:.2f}",
        ]
        for r in rows
    ]
    return header, body


def load_demo_results(path) -> dict[str, VolumeResult]:
    """{method: VolumeResult} from a ``demo.json``."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != DEMO_FORMAT:
        raise ValueError(f"{path} is not a localvol demo.json (format {data.get('format')!r})")
    return {name: VolumeResult.from_dict(value) for name, value in data["results"].items()}
