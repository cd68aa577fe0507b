"""Figures of local-volume runs, saved as PNG files (matplotlib, Agg; an optional dependency).

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so a
user's interactive backend is never switched), saves a PNG and returns its ``Path``. All volumes are
in nats. A point of a series is a ``VolumeResult`` or a plain dict with ``log_volume`` and optionally
``interval`` ((low, high) nats) and the x value (``cutoff`` or ``step``), as ``reproduce`` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

_INSTALL_HINT = "plots need matplotlib: pip install 'localvol_fast[demo]'"


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    """A fresh (Figure, flat axes list) on the Agg canvas; a clear error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _value(point, name: str, default=None):
    if isinstance(point, Mapping):
        return point.get(name, default)
    if name == "interval":  # a VolumeResult's interval() is a method; its 95% interval a property
        return getattr(point, "log_volume_interval", default)
    value = getattr(point, name, default)
    return value.tolist() if hasattr(value, "tolist") else value


def _xy(points: Sequence, x_name: str):
    """(x, y, lower error, upper error) lists; points without a finite log volume are dropped."""
    xs, ys, below, above = [], [], [], []
    for point in points:
        x = _value(point, x_name)
        if x is None and x_name == "cutoff":
            x = getattr(point, "cutoff", None)
        y = _value(point, "log_volume")
        if x is None or y is None or not math.isfinite(y):
            continue
        interval = _value(point, "interval")
        low, high = (y, y) if interval is None else interval
        xs.append(float(x))
        ys.append(float(y))
        below.append(max(y - low, 0.0) if math.isfinite(low) else 0.0)
        above.append(max(high - y, 0.0) if math.isfinite(high) else 0.0)
    return xs, ys, below, above


_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def plot_estimate_histograms(results, path, *, title: str | None = None, bins: int = 30, overlay: bool = False) -> Path:
    """Histogram of each run's per-direction log estimates (nats).

    results: a ``VolumeResult`` or a mapping label -> ``VolumeResult`` (or dict with ``estimates``,
    ``log_volume`` and ``interval``). Each run's log-mean-exp (its log volume) is a vertical line and
    its bootstrap 95% interval is shaded. By default each run gets its own panel and x range (methods
    differ by far more than one run's spread); ``overlay=True`` draws all runs on one shared axis, to
    compare e.g. a clean and a poisoned network.
    """
    if not isinstance(results, Mapping) or "estimates" in results:
        results = {"": results}
    if overlay:
        figure, axes = _figure(6.4, 4.2)
        axes = axes * len(results)
    else:
        ncols = min(len(results), 3)
        nrows = -(-len(results) // ncols)
        figure, axes = _figure(4.4 * ncols, 3.6 * nrows, ncols=ncols, nrows=nrows)
        for ax in axes[len(results) :]:
            ax.set_visible(False)
    for k, (ax, (label, result)) in enumerate(zip(axes, results.items())):
        estimates = [float(v) for v in _value(result, "estimates") if math.isfinite(float(v))]
        log_volume = float(_value(result, "log_volume"))
        low, high = _value(result, "interval") or (log_volume, log_volume)
        ess = _value(result, "effective_sample_size")
        bar_color, line_color = (_COLORS[k % len(_COLORS)],) * 2 if overlay else (_COLORS[0], _COLORS[3])
        prefix = f"{label}: " if overlay else ""
        ax.hist(
            estimates,
            bins=bins,
            color=bar_color,
            alpha=0.6 if overlay else 0.8,
            label=f"{prefix}directions (n={len(estimates)})",
        )
        if math.isfinite(low) and math.isfinite(high):
            ax.axvspan(
                low,
                high,
                color=_COLORS[1] if not overlay else bar_color,
                alpha=0.2,
                label=f"{prefix}95% interval (bootstrap)",
            )
        ax.axvline(log_volume, color=line_color, linewidth=2, label=f"{prefix}log-mean-exp = {log_volume:.6g}")
        ax.set_xlabel("per-direction log estimate (nats)")
        ax.set_ylabel("directions")
        if not overlay:
            ax.set_title(f"{label}" + (f"  (ESS {ess:.3g})" if ess is not None else ""))
        ax.legend(fontsize=7, loc="upper left")
        ax.ticklabel_format(axis="x", useOffset=False)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_volume_vs_cutoff(
    series,
    path,
    *,
    dim: int,
    ceiling: float | None = None,
    title: str | None = None,
) -> Path:
    """Log volume (nats) against the cutoff eps (log axis), with bootstrap 95% error bars.

    series: a sequence of points or a mapping label -> sequence of points (``VolumeResult``s, or dicts
    with ``cutoff``, ``log_volume``, ``interval``). The dashed reference line has slope D/2 per unit of
    ln eps (the quadratic regime, volume ~ eps^(D/2)) through the middle point of the first series;
    ``ceiling`` (e.g. -|theta0|^2 / (2 sigma^2)) is drawn as a horizontal line.
    """
    if not isinstance(series, Mapping):
        series = {"log volume": series}
    figure, (ax,) = _figure(6.4, 4.4)
    first = None
    for label, points in series.items():
        xs, ys, below, above = _xy(points, "cutoff")
        if not xs:
            continue
        ax.errorbar(xs, ys, yerr=[below, above], marker="o", markersize=4, capsize=3, label=label)
        if first is None:
            first = (xs, ys)
    if first is not None:
        xs, ys = first
        order = sorted(range(len(xs)), key=xs.__getitem__)
        mid = order[len(order) // 2]
        x0, y0 = xs[mid], ys[mid]
        grid = sorted(xs)
        ax.plot(
            grid,
            [y0 + 0.5 * dim * (math.log(x) - math.log(x0)) for x in grid],
            linestyle="--",
            color="gray",
            label=f"slope D/2 = {dim / 2:,.0f} nats per unit ln eps",
        )
    if ceiling is not None and math.isfinite(ceiling):
        ax.axhline(ceiling, color="black", linestyle=":", label=f"prior ceiling -|θ0|²/(2σ²) = {ceiling:.4g}")
    ax.set_xscale("log")
    ax.set_xlabel("cutoff eps (nats, log scale)")
    ax.set_ylabel("log volume (nats)")
    all_y = [y for points in series.values() for y in _xy(points, "cutoff")[1]]
    if all_y:
        # The reference line runs far past the data where the volume saturates; keep the data in view.
        top = max(all_y + ([ceiling] if ceiling is not None and math.isfinite(ceiling) else []))
        span = max(top - min(all_y), 1.0)
        ax.set_ylim(min(all_y) - 0.15 * span, top + 0.1 * span)
    ax.set_title(title or f"log volume vs cutoff (D = {dim:,})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_volume_over_training(series, path, *, title: str | None = None) -> Path:
    """Log volume (nats) over training checkpoints (step on a log axis), one line per series.

    series: a sequence of points or a mapping label -> sequence of points (dicts with ``step``,
    ``log_volume`` and ``interval``); e.g. {"isotropic": [...], "adam": [...]}. Steps must be >= 1.
    """
    if not isinstance(series, Mapping):
        series = {"log volume": series}
    figure, (ax,) = _figure(6.4, 4.4)
    for label, points in series.items():
        xs, ys, below, above = _xy(points, "step")
        keep = [k for k, x in enumerate(xs) if x > 0]
        if not keep:
            continue
        ax.errorbar(
            [xs[k] for k in keep],
            [ys[k] for k in keep],
            yerr=[[below[k] for k in keep], [above[k] for k in keep]],
            marker="o",
            markersize=4,
            capsize=3,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("log volume (nats)")
    ax.set_title(title or "log volume over training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)
