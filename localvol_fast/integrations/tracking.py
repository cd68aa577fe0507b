"""``VolumeTracker``: the local volume measured every k steps of a training loop, leaving the run as it was.

Each due step runs ``localvol_fast.nn.estimator.estimate(model, data, optimizer=optimizer, **options)``
on held-out ``data`` and keeps one plain row per cutoff in ``tracker.history`` (JSON-ready floats and
ints, volumes in nats) and the ``VolumeResult`` in ``tracker.results``. A hand-written loop::

    import torch
    from localvol_fast.integrations import VolumeTracker

    tracker = VolumeTracker((x_val, y_val), every=100, preconditioner="adam", preconditioner_eps=1e-2,
                            n_samples=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, (x, y) in enumerate(train_loader, start=1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracker(model, step, optimizer=optimizer)  # None except every 100th step: a VolumeResult then
    tracker.history[-1]["log10_volume"]  # one dict per measured step (see ``row``)
    tracker.save("volume.csv")  # or .json; tracker.columns()["log10_volume"] to plot against ["step"]

Leaving the run as it was: the training continues bit for bit as it would have without the tracker.
``estimate`` itself gives the model back exactly (``nn.preservation``: parameters and buffers, their
values, memory and ``requires_grad``, each ``.grad`` object and its values, every module's train/eval
mode), and it only reads the optimizer (the Adam preconditioner takes ``exp_avg_sq``). The tracker
adds what ``estimate`` does not cover: every global random state (torch CPU, torch CUDA on every
device when CUDA is initialized, Python ``random``, numpy's legacy global generator) is saved before
and put back after each estimate, so code that draws from them while the volume is measured (a custom
``loss_fn``, a model's forward) cannot shift the training's dropout masks or data order; and the
optimizer's state tensors are checked, without copying them, to be the same objects at the same
version counters (no in-place write) with the same hyperparameters afterwards, else a RuntimeError
says so (a changed optimizer could not be given back without a full copy of its state).

Comparable steps: every estimate uses the same seed (``seed=0`` unless given), so successive steps
probe the same directions (in the same preconditioned space) and differences between steps come from
the weights, not from sampling. Progress bars are off unless ``progress=True`` is passed.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import random
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from localvol_fast.core.checks import check_integer
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.options import RunOptions
from localvol_fast.nn.estimator import estimate

DEFAULT_SEED = 0  # every estimate of a tracker probes the same directions unless seed= is given
# estimate's arguments a tracker fills itself: the model and optimizer come with each call, data once.
_PER_CALL = ("model", "data", "optimizer")
_ESTIMATE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(estimate).parameters.items() if name not in _PER_CALL
}
_ESTIMATE_OPTIONS = tuple(_ESTIMATE_DEFAULTS)
# Checked when the tracker is built (not first at a due step, maybe hours into training): the run's options.
_RUN_OPTIONS = ("cutoff", "n_samples", "seed", "rtol", "batch_size", "progress", "distributed")
# A journal holds one estimate's directions: a tracker runs one estimate per due step.
_ONE_RUN_ONLY = ("output", "resume")
_SAVE_FORMATS = (".json", ".csv")


class VolumeTracker:
    """Estimate the local volume on ``data`` at due steps of a training loop (module docstring).

    data: held-out evaluation data, anything ``estimate`` takes: a tensor of inputs, an (inputs, targets)
        pair, a DataLoader, or a dict / BatchEncoding with input_ids and attention_mask.
    every: measure when step % every == 0 (a positive integer). steps: measure at these steps (an
        iterable of integers >= 0, e.g. a log-spaced grid). At least one of them; with both, a step
        is due when either says so.
    name: the prefix of the values ``log_values`` gives a logger ("volume/log_volume", ...).
    estimate_options: keyword options of ``estimate`` (neighborhood, cutoff, n_samples, preconditioner,
        preconditioner_eps, sigma, ...); ``progress`` defaults to False and ``seed`` to 0 here.

    Attributes: history (list of dict rows, see ``row``), results (what each measured step's
    ``estimate`` returned: a VolumeResult, or a list of them for a list of cutoffs), measured_steps.
    """

    def __init__(self, data, *, every=None, steps=None, name: str = "volume", **estimate_options):
        self.every, self.steps = _checked_schedule(every, steps)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string (the prefix of logged values), got {name!r}")
        self.name = name
        self.data = data
        self.options = _checked_options({"progress": False, "seed": DEFAULT_SEED, **estimate_options})
        self.history: list[dict] = []
        self.results: list = []
        self.measured_steps: list[int] = []

    @property
    def uses_optimizer(self) -> bool:
        """Whether estimates read the optimizer: only the Adam preconditioner does."""
        preconditioner = self.options.get("preconditioner")
        return isinstance(preconditioner, str) and preconditioner == "adam"

    def is_due(self, step) -> bool:
        """Whether ``step`` (an integer >= 0) is one to measure."""
        step = check_integer(step, "step", minimum=0, what="the training step")
        return (self.every is not None and step % self.every == 0) or (self.steps is not None and step in self.steps)

    def __call__(self, model: torch.nn.Module, step, optimizer=None) -> VolumeResult | list[VolumeResult] | None:
        """At a due ``step``, estimate the volume of ``model`` (with ``optimizer``'s live state when
        preconditioner="adam"; the optimizer is not read otherwise), record it and return the result;
        at other steps return None without touching anything."""
        if not self.is_due(step):
            return None
        step = int(step)
        if self.uses_optimizer and optimizer is None:
            raise ValueError(
                "this tracker uses preconditioner='adam', which reads the optimizer's moments: "
                "call it as tracker(model, step, optimizer=optimizer) with the training's live optimizer"
            )
        used = optimizer if self.uses_optimizer else None
        started = time.perf_counter()
        with training_state_preserved(used):
            result = estimate(model, self.data, optimizer=used, **self.options)
        seconds = time.perf_counter() - started
        results = result if isinstance(result, list) else [result]
        self.history.extend(row(step, r, seconds) for r in results)
        self.results.append(result)
        self.measured_steps.append(step)
        return result

    def log_values(self, step=None) -> dict[str, float]:
        """The figures of one measured step (default: the last) as {"<name>/<figure>": float}, for a
        logger (TensorBoard, W&B); with several cutoffs each key ends in "@<cutoff>"."""
        if not self.history:
            raise ValueError("nothing measured yet: log_values needs a measured step")
        step = self.history[-1]["step"] if step is None else step
        rows = [r for r in self.history if r["step"] == step]
        if not rows:
            raise ValueError(f"step {step!r} was not measured; measured steps: {self.measured_steps}")
        values = {}
        for r in rows:
            suffix = f"@{r['cutoff']:g}" if len(rows) > 1 else ""
            for key in ("log_volume", "log10_volume", "interval_low", "interval_high", "seconds"):
                values[f"{self.name}/{key}{suffix}"] = float(r[key])
        return values

    def columns(self) -> dict[str, list]:
        """The history by column, {"step": [...], "log_volume": [...], ...}, for plotting."""
        keys = _column_names(self.history)
        return {k: [r.get(k) for r in self.history] for k in keys}

    def save(self, path) -> Path:
        """Write the history to ``path``: ".json" (the rows, the tracker's name and its estimate options;
        inf/NaN as JSON's Infinity/NaN) or ".csv" (one row per measured step and cutoff)."""
        path = Path(path)
        if path.suffix.lower() not in _SAVE_FORMATS:
            raise ValueError(
                f"save writes {' or '.join(_SAVE_FORMATS)} files, got {str(path)!r}; name the file *.json or *.csv"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            options = {k: _json_ready(v) for k, v in self.options.items()}
            path.write_text(json.dumps({"name": self.name, "options": options, "history": self.history}, indent=1))
        else:
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=_column_names(self.history))
                writer.writeheader()
                writer.writerows(self.history)
        return path


def row(step: int, result: VolumeResult, seconds: float) -> dict:
    """One history row: step; cutoff; log_volume and log10_volume (nats, and log10 = nats / ln 10);
    interval_low/high (the bootstrap 95% interval of log_volume, nats); n_samples; dim (D); seed;
    effective_sample_size; seconds (wall time of the whole estimate); preconditioner and
    preconditioner_eps (None where there is no eps, e.g. isotropic)."""
    low, high = result.log_volume_interval
    precond = result.info.get("preconditioner") or {}
    eps = precond.get("eps")
    return {
        "step": int(step),
        "cutoff": float(result.cutoff),
        "log_volume": float(result.log_volume),
        "log10_volume": float(result.log10_volume),
        "interval_low": float(low),
        "interval_high": float(high),
        "n_samples": int(result.n_samples),
        "dim": int(result.dim),
        "seed": _json_ready(result.config.get("seed")),
        "effective_sample_size": float(result.effective_sample_size),
        "seconds": float(seconds),
        "preconditioner": str(precond.get("name", "isotropic")),
        "preconditioner_eps": None if eps is None else float(eps),
    }


@contextlib.contextmanager
def training_state_preserved(optimizer=None):
    """Put back every global random state after the block, and check that ``optimizer`` (if given) was
    not changed by it (module docstring). The model itself is ``estimate``'s to give back."""
    before = _optimizer_fingerprint(optimizer) if optimizer is not None else None
    with random_states_preserved():
        yield
    if optimizer is not None and _optimizer_fingerprint(optimizer) != before:
        raise RuntimeError(
            "the optimizer's state or hyperparameters changed while the volume was estimated; the training "
            "would not continue as it was. Please report this with the optimizer's type "
            f"({type(optimizer).__name__})"
        )


@contextlib.contextmanager
def random_states_preserved():
    """Save torch's CPU (and, when CUDA is initialized, every CUDA device's) random state, Python's
    ``random`` and numpy's legacy global state; put them back after the block, also after an error."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _optimizer_fingerprint(optimizer) -> tuple:
    """What identifies the optimizer's state without copying it: each state tensor's identity and
    version counter (bumped by every in-place write), other state values, and the groups' hyperparameters."""
    state = []
    for k, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            entries = optimizer.state.get(p, {})
            for key in sorted(entries):
                value = entries[key]
                kept = (id(value), value._version) if isinstance(value, torch.Tensor) else repr(value)
                state.append((k, id(p), key, kept))
    groups = [[(key, repr(v)) for key, v in sorted(g.items()) if key != "params"] for g in optimizer.param_groups]
    return tuple(state), repr(groups), len(optimizer.state)


def _checked_schedule(every, steps) -> tuple:
    """(every or None, frozenset of steps or None); at least one must be given."""
    if every is None and steps is None:
        raise ValueError(
            "VolumeTracker needs every= (measure every k steps) or steps= (the steps to measure), got neither"
        )
    if every is not None:
        every = check_integer(every, "every", what="measure when step % every == 0")
    if steps is not None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            hint = ""
            if isinstance(steps, int):
                hint = f"; for one step pass steps=[{steps!r}], for a period pass every={steps!r}"
            raise TypeError(f"steps must be an iterable of integers >= 0, got {steps!r} ({type(steps).__name__}){hint}")
        steps = frozenset(check_integer(s, "each of steps", minimum=0, what="a training step") for s in steps)
        if not steps:
            raise ValueError("steps is empty: pass the steps to measure (integers >= 0), or every=k")
    return every, steps


def _checked_options(options: dict) -> dict:
    """Only ``estimate``'s own keyword options (the model and optimizer come with each call, and no
    journal); the run's options (cutoff, n_samples, seed, ...) checked now by ``RunOptions.checked``,
    the others by ``estimate`` at the first due step."""
    if "optimizer" in options:
        raise TypeError(
            "pass the optimizer with each call, tracker(model, step, optimizer=optimizer), not to VolumeTracker: "
            "its state changes every step and the estimate must read the live one"
        )
    unknown = sorted(set(options) - set(_ESTIMATE_OPTIONS))
    if unknown:
        raise TypeError(
            f"VolumeTracker got option(s) {unknown} that estimate does not take; "
            f"its options are: {', '.join(_ESTIMATE_OPTIONS)}"
        )
    journal = [name for name in _ONE_RUN_ONLY if options.get(name) not in (None, False)]
    if journal:
        raise ValueError(
            f"VolumeTracker does not take {' or '.join(journal)}=: a journal holds one estimate's directions, and "
            "a tracker runs one estimate per due step; keep the figures with tracker.save(path)"
        )
    RunOptions.checked(**{name: options.get(name, _ESTIMATE_DEFAULTS[name]) for name in _RUN_OPTIONS})
    return dict(options)


def _column_names(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return list(names)


def _json_ready(value):
    """A JSON value as it is; anything else (a loss function, a tensor) by its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return list(value)
    return repr(value)
