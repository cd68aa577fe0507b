"""``localvol demo``: train the paper's digits MLP and estimate its volume with three direction
distributions (isotropic, Adam, Fisher), writing ``demo.json`` and ``demo.png``.

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
from localvol_fast.apps.digits import PRIOR_SIGMA, TrainedDigits, train_digits
from localvol_fast.apps.plots import plot_estimate_histograms
from localvol_fast.apps.reproduce.experiments import volume
from localvol_fast.core.result import VolumeResult

DEMO_METHODS = ("isotropic", "adam", "fisher")
DEMO_FORMAT = "localvol_fast.demo"


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
    steps: int = 500,
    n_samples: int = 128,
    cutoff: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    say: Callable[[str], None] = lambda message: None,
) -> DemoRun:
    """Train, estimate with each of ``DEMO_METHODS`` and write ``demo.png`` and ``demo.json`` into the
    existing folder ``out``; ``say`` receives the progress messages."""
    started = time.perf_counter()
    say(f"training the digits MLP ({steps} full-batch Adam steps) ...")
    run = train_digits(steps, seed=seed)
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
        say(f"[{k}/{len(DEMO_METHODS)}] {method} directions")
        t0 = time.perf_counter()
        results[method] = volume(run, method, cutoff=cutoff, n_samples=n_samples, seed=seed, progress=progress)
        rows.append(demo_row(method, results[method], time.perf_counter() - t0))
    return results, rows


def demo_headline(settings: dict) -> str:
    """The line above the demo's table: the network and the estimate's settings."""
    return (
        f"digits MLP (D = {settings['dim']:,}, {settings['steps']} steps, "
        f"test accuracy {settings['test_accuracy']:.3f}): "
        f"KL neighborhood eps = {settings['cutoff']:g}, Gaussian prior sigma = {settings['sigma']:.4g}, "
        f"{settings['n_samples']} directions per method"
    )


def demo_row(method: str, result: VolumeResult, seconds: float) -> dict:
    low, high = result.log_volume_interval
    return {
        "method": method,
        "log_volume": result.log_volume,
        "log10_volume": result.log10_volume,
        "interval": [low, high],
        "effective_sample_size": result.effective_sample_size,
        "evals_per_direction": result.evals_per_direction,
        "seconds": seconds,
    }


def format_table(rows: list[dict]) -> str:
    """The demo's table: method, log volume (nats, log10), 95% interval, ESS, evaluations, seconds."""
    header = ["method", "log volume (nats)", "log10 volume", "95% interval (nats)", "ESS", "evals/dir", "seconds"]
    body = [
        [
            r["method"],
            f"{r['log_volume']:.1f}",
            f"{r['log10_volume']:.1f}",
            f"[{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]",
            f"{r['effective_sample_size']:.3g}",
            f"{r['evals_per_direction']:.2f}",
            f"{r['seconds']:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[k]) for row in body)) for k, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in body])


def load_demo_results(path) -> dict[str, VolumeResult]:
    """{method: VolumeResult} from a ``demo.json``."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != DEMO_FORMAT:
        raise ValueError(f"{path} is not a localvol demo.json (format {data.get('format')!r})")
    return {name: VolumeResult.from_dict(value) for name, value in data["results"].items()}
