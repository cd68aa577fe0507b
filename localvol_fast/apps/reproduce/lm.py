"""The paper's Pythia findings on a small GPT-NeoX trained here on the standard library's source code.

``reproduce_lm(out)`` trains a randomly initialized (seeded) ``GPTNeoXForCausalLM`` built from a
``transformers.GPTNeoXConfig`` on byte-tokenized ``.py`` files of the standard library (``corpus``) and
measures, as the paper does for Pythia-31m:

- at every checkpoint of a log-spaced step grid (0, 1, 2, 4, ..., 2^k, last) the log local volume
  (nats) of the KL neighborhood on held-out files, cutoff 1e-2, with isotropic directions and with the
  Adam preconditioner p = 1 / (sqrt(v) + 1e-2) built from the LIVE AdamW state at that step (v the raw
  second moment; step 0 has no Adam state, so only isotropic is measured there);
- the cutoff scan at the last checkpoint (the slope of log V against ln eps, against D/2);
- the Adam-vs-isotropic gain, log V_adam - log V_iso (nats; / ln 10 for orders of magnitude).

Prior: N(0, sigma^2 I) about the origin with sigma = the RMS of all parameters at initialization (the
seeded step-0 model), the paper's choice for Pythia (0.03998 there): the prior is the distribution the
network was drawn from, summarized by one scale.

Training: AdamW (betas 0.9 / 0.95, eps 1e-8, weight decay 0.01, gradient norm clipped at 1), peak
learning rate ``lr``, linear warmup over the first 1/16 of the steps then cosine decay to 0.1 x peak
(Pythia's schedule shape; its warmup is 1% of 143,000 steps); batches of random windows of the training
text drawn from a seeded ``torch.Generator`` (no dropout), so a run is deterministic and resumable.

Everything lands in ``out`` as it finishes: settings.json, checkpoints/step_XXXXXX.pt (model, optimizer,
scheduler, batch generator, losses), measurements/*.json (one per estimate); a rerun with the same
settings continues from the last checkpoint and skips finished estimates; other settings are an error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import torch

from localvol_fast import __version__
from localvol_fast.apps.reproduce.corpus import heldout_windows, load_corpus
from localvol_fast.apps.reproduce.experiments import record_of
from localvol_fast.apps.reproduce.lm_report import (
    findings,
    write_lm_plots,
    write_lm_report,
)
from localvol_fast.apps.reproduce.verdicts import quadratic_slope
from localvol_fast.core.checks import check_flag, check_integer, check_seed
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.integrations import VolumeTracker
from localvol_fast.nn.estimator import estimate

CUTOFF = 1e-2  # nats: the paper's main KL cutoff
PRECONDITIONER_EPS = 1e-2  # the paper's Pythia preconditioner eps
METHODS = ("isotropic", "adam")
FORMAT = "localvol_fast.reproduce.lm"


def settings(quick: bool = False) -> dict:
    """The run's sizes: the default or ``quick``. Timed with 1 torch thread on a shared 2-core machine
    (load ~12): quick end to end about 30 s (50 s with imports); the default estimated from its timed parts
    (0.127 s per update, 5.4-7.0 s per estimate, 33 s per cutoff scan) at about 6-8 minutes."""
    if quick:
        return {
            "hidden_size": 32, "layers": 2, "heads": 2, "seq_len": 64, "batch_size": 8, "steps": 256,
            "lr": 3e-3, "train_bytes": 400_000, "heldout_bytes": 60_000, "eval_windows": 8, "n_samples": 32,
            "scan_cutoffs": [1e-3, 1e-2, 1e-1, 1.0], "evaluation": "vmap",
        }
    # evaluation: the faster mode measured per estimate on each model, 1 CPU thread of a loaded 2-core machine:
    # hidden 32: vmap 0.20-0.31 s, in place 0.31-0.43 s, sequential 0.35 s (32 directions, 8 x 64 tokens);
    # hidden 64: in place 7.0 s, vmap 10.7 s (128 directions, 16 x 128 tokens).
    return {
        "hidden_size": 64, "layers": 2, "heads": 4, "seq_len": 128, "batch_size": 16, "steps": 1024,
        "lr": 3e-3, "train_bytes": 2_000_000, "heldout_bytes": 200_000, "eval_windows": 16, "n_samples": 128,
        "scan_cutoffs": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "evaluation": "inplace",
    }


def step_grid(last: int) -> list[int]:
    """0, 1, 2, 4, ..., the powers of two below ``last``, and ``last`` (the checkpoint steps)."""
    last = check_integer(last, "steps", what="training steps")
    grid, power = [0], 1
    while power < last:
        grid.append(power)
        power *= 2
    return grid + [last]


def build_model(config: dict, seed: int) -> torch.nn.Module:
    """A GPT-NeoX (byte vocabulary, no dropout, untied embeddings, rotary on a quarter of each head as in
    Pythia) initialized from ``seed`` without touching the caller's global RNG."""
    try:  # here, not at the top: the CLI (and its demo) must import without the optional transformers
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except ImportError:
        raise ImportError("reproduce lm needs transformers: pip install 'localvol_fast[hf]'") from None
    model_config = GPTNeoXConfig(
        vocab_size=256, hidden_size=config["hidden_size"], num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"], intermediate_size=4 * config["hidden_size"],
        max_position_embeddings=config["seq_len"], rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.02,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(model_config)
    return model


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak learning rate before update ``step`` (0-based): linear warmup over
    max(1, steps // 16) updates, then cosine from 1 down to 0.1 at the last update."""
    warmup = max(1, steps // 16)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: dict):
    """(AdamW, LambdaLR) with the recipe of the module docstring."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config["steps"]))
    return optimizer, scheduler


def parameter_rms(model: torch.nn.Module) -> float:
    """sqrt(mean theta_i^2) over all parameters, in float64 (the prior's sigma at initialization)."""
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    return math.sqrt(total / sum(p.numel() for p in model.parameters()))


def prior_ceiling(model: torch.nn.Module, sigma: float) -> float:
    """-|theta0|^2 / (2 sigma^2) (nats): the log prior density ratio at the anchor, where the paper sees the
    volume saturate at large cutoffs."""
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    return -total / (2 * sigma**2)


class Trainer:
    """The training state (model, AdamW, schedule, batch generator, losses) and its checkpoints."""

    def __init__(self, config: dict, train_stream: torch.Tensor, seed: int):
        self.config, self.stream = config, train_stream
        if train_stream.numel() <= config["seq_len"] + 1:
            raise ValueError(f"the training text has {train_stream.numel()} tokens, fewer than seq_len + 2; raise train_bytes")
        self.model = build_model(config, seed)
        self.initial_rms = parameter_rms(self.model)
        self.optimizer, self.scheduler = make_optimizer(self.model, config)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.step, self.losses = 0, []
        self.train_seconds = 0.0  # wall time of the updates, summed over resumed invocations

    def train_step(self) -> float:
        """One AdamW update on ``batch_size`` random windows; returns the batch's mean cross-entropy (nats)."""
        length, rows = self.config["seq_len"], self.config["batch_size"]
        starts = torch.randint(0, self.stream.numel() - length, (rows,), generator=self.generator)
        batch = torch.stack([self.stream[s : s + length] for s in starts.tolist()])
        self.model.train()
        loss = self.model(input_ids=batch, labels=batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def state(self) -> dict:
        return {
            "step": self.step, "losses": list(self.losses), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(), "initial_rms": self.initial_rms, "train_seconds": self.train_seconds,
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step, self.losses, self.initial_rms = int(state["step"]), list(state["losses"]), float(state["initial_rms"])
        self.train_seconds = float(state["train_seconds"])


def checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}.pt"


def measurement_path(out: Path, name: str) -> Path:
    return out / "measurements" / f"{name}.json"


def _write_json(path: Path, payload) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)


def save_checkpoint(out: Path, trainer: Trainer) -> None:
    path = checkpoint_path(out, trainer.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(trainer.state(), partial)
    partial.replace(path)


def latest_checkpoint(out: Path, grid: list[int]) -> int | None:
    """The largest grid step with a saved checkpoint (None if none)."""
    saved = [s for s in grid if checkpoint_path(out, s).exists()]
    return max(saved) if saved else None


@contextlib.contextmanager
def _quiet():
    """Unbounded / non-monotone directions warn (they are counted in ``status``), and vmap over CPU
    attention warns that it has no batching rule (it falls back to a loop, measured and still faster)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        yield


class _Measurer:
    """The in-training estimates, one ``VolumeTracker`` per method (it leaves the model, the optimizer and
    every random state as they were), each result saved under ``out/measurements`` as it finishes."""

    def __init__(self, out: Path, data: dict, config: dict, grid: list[int], sigma: float, seed: int, on_run=None):
        self.out, self.data, self.on_run = out, data, on_run
        common = {
            "cutoff": CUTOFF, "n_samples": config["n_samples"], "sigma": sigma, "seed": seed,
            "evaluation": config["evaluation"], "progress": False,
        }
        self.options = {
            "isotropic": {**common, "preconditioner": None},
            "adam": {**common, "preconditioner": "adam", "preconditioner_eps": PRECONDITIONER_EPS},
        }
        self.steps = {"isotropic": list(grid), "adam": [s for s in grid if s >= 1]}  # no Adam state at step 0
        self.trackers = {m: VolumeTracker(data, steps=self.steps[m], name=f"volume/{m}", **self.options[m]) for m in METHODS}

    def pending(self, step: int) -> list[str]:
        return [m for m in METHODS if step in self.steps[m] and not measurement_path(self.out, f"step_{step:06d}_{m}").exists()]

    def __call__(self, model, step: int, optimizer) -> None:
        """Estimate every method not yet saved at ``step`` (the training is left as it was)."""
        for method in self.pending(step):
            started = time.perf_counter()
            with _quiet():
                result = self.trackers[method](model, step, optimizer=optimizer)
            record = record_of(result, step=step, method=method, wall_seconds=time.perf_counter() - started)
            _write_json(measurement_path(self.out, f"step_{step:06d}_{method}"), record)
            if self.on_run is not None:
                self.on_run(f"step {step} {method}", record)


def heldout_loss(model: torch.nn.Module, data: dict) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on the held-out windows (no gradient)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=data["input_ids"], labels=data["input_ids"]).loss)
    model.train(was_training)
    return loss


def run_training(trainer: Trainer, grid: list[int], *, out: Path | None = None, on_checkpoint=None, on_step=None) -> None:
    """Train ``trainer`` up to ``grid[-1]`` updates. At each grid step (after that many updates) the
    checkpoint is saved (when ``out`` is given and it is not there yet), then
    ``on_checkpoint(model, step, optimizer)`` runs; ``on_step(loss)`` follows each update."""
    while True:
        if trainer.step in grid:
            if out is not None and not checkpoint_path(out, trainer.step).exists():
                save_checkpoint(out, trainer)
            if on_checkpoint is not None:
                on_checkpoint(trainer.model, trainer.step, trainer.optimizer)
        if trainer.step >= grid[-1]:
            return
        started = time.perf_counter()
        loss = trainer.train_step()
        trainer.train_seconds += time.perf_counter() - started
        if on_step is not None:
            on_step(loss)


def _check_same_settings(out: Path, identity: dict) -> None:
    """Write out/settings.json, or refuse to continue a run of other settings."""
    path = out / "settings.json"
    identity = json.loads(json.dumps(identity))  # as it reads back (tuples become lists)
    if path.exists():
        saved = json.loads(path.read_text())
        differing = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if differing:
            shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {identity.get(k)!r}" for k in differing)
            raise ValueError(
                f"{str(out)!r} holds a run with other settings ({shown}); rerun with the same settings to "
                "continue it, or use another (or an empty) output folder"
            )
    else:
        _write_json(path, identity)


def _scan(out: Path, trainer: Trainer, measurer: _Measurer, config: dict, on_run) -> dict:
    """The cutoff scan at the last checkpoint, per method (all cutoffs searched together); saved."""
    scans = {}
    for method in METHODS:
        path = measurement_path(out, f"scan_{method}")
        if not path.exists():
            started = time.perf_counter()
            opt = {"optimizer": trainer.optimizer} if method == "adam" else {}
            options = {**measurer.options[method], "cutoff": list(config["scan_cutoffs"])}
            with _quiet():
                results = estimate(trainer.model, measurer.data, **options, **opt)
            seconds = time.perf_counter() - started
            records = [record_of(r, step=trainer.step, method=method, wall_seconds=seconds) for r in results]
            _write_json(path, records)
            if on_run is not None:
                on_run(f"scan {method}", records[len(records) // 2])
        scans[method] = json.loads(path.read_text())
    return scans


def _configured(quick: bool, n_samples, overrides) -> dict:
    config = settings(quick)
    unknown = sorted(set(overrides or {}) - set(config) - {"root"})
    if unknown:
        raise ValueError(f"overrides has unknown settings {unknown}; known: {sorted(config)} and 'root'")
    config.update(overrides or {})
    if n_samples is not None:
        config["n_samples"] = check_integer(n_samples, "n_samples", what="directions per estimate")
    if "root" in config:
        config["root"] = str(config["root"])
    return config


def reproduce_lm(
    out, *, quick: bool = False, seed: int = 0, n_samples: int | None = None, progress: bool = True,
    overrides: dict | None = None,
) -> dict:
    """Train, measure and report (module docstring); writes out/results.json, out/report.md and the plots.

    quick: small sizes (under 2 minutes on 2 CPU cores). seed: model init, batch order and directions.
    n_samples: directions per estimate (default: the settings'). overrides: replaces entries of
    ``settings(quick)`` (e.g. tiny sizes in tests; "root" reads another folder of .py files).
    A rerun into the same ``out`` with the same settings resumes; other settings are a ValueError.
    Returns the results dict (what results.json holds).
    """
    quick, progress, seed = check_flag(quick, "quick"), check_flag(progress, "progress"), check_seed(seed)
    config = _configured(quick, n_samples, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = load_corpus(train_bytes=config["train_bytes"], heldout_bytes=config["heldout_bytes"], root=config.get("root"))
    data = heldout_windows(corpus.stream("heldout"), config["eval_windows"], config["seq_len"])
    grid = step_grid(config["steps"])
    _check_same_settings(out, {"format": FORMAT, "settings": config, "seed": seed, "corpus": corpus.fingerprint})
    trainer = Trainer(config, corpus.stream("train"), seed)
    sigma = trainer.initial_rms  # the step-0 model's RMS: the prior, whatever checkpoint is resumed
    resumed = latest_checkpoint(out, grid)
    if resumed is not None:
        trainer.load(torch.load(checkpoint_path(out, resumed), weights_only=True))
    bar = ProgressBar(config["steps"] + 2 * len(grid) + 1, label="lm steps+estimates", enabled=progress)
    bar.update(trainer.step + sum(measurement_path(out, n).exists() for n in _measurement_names(grid)))

    def on_run(label: str, record: dict) -> None:
        bar.update(1, run=label.replace(" ", "_"), log_volume=record["log_volume"])

    measurer = _Measurer(out, data, config, grid, sigma, seed, on_run)

    def on_checkpoint(model, step, optimizer) -> None:
        path = measurement_path(out, f"step_{step:06d}_heldout")
        if not path.exists():
            _write_json(path, {"step": step, "heldout_loss": heldout_loss(model, data), "train_losses": trainer.losses[-8:]})
        measurer(model, step, optimizer)

    run_training(trainer, grid, out=out, on_checkpoint=on_checkpoint, on_step=lambda loss: bar.update(1, loss=loss))
    scans = _scan(out, trainer, measurer, config, on_run)
    bar.close()
    results = collect(out, grid, trainer, scans, measurer)
    results.update({
        "format": FORMAT, "version": __version__, "quick": quick, "seed": seed, "settings": config,
        "grid": grid, "sigma": sigma, "ceiling": prior_ceiling(trainer.model, sigma), "corpus": corpus.summary(),
        "resumed_from_step": resumed,
        "torch_threads": torch.get_num_threads(), "seconds_this_run": time.perf_counter() - started,
    })
    return _write_outputs(results, out)


def _write_outputs(results: dict, out: Path) -> dict:
    """The verdicts, plots, report.md and results.json of a finished run; returns ``results`` with them."""
    results["findings"] = results["paper_comparison"] = findings(results)
    results["plots"] = write_lm_plots(results, out)
    results["files"] = {"report": str(out / "report.md"), "results": str(out / "results.json")}
    write_lm_report(results, out / "report.md")
    _write_json(out / "results.json", results)
    return results


def _measurement_names(grid: list[int]) -> list[str]:
    names = [f"step_{s:06d}_isotropic" for s in grid] + [f"step_{s:06d}_adam" for s in grid if s >= 1]
    return names + ["scan_isotropic", "scan_adam"]


def collect(out: Path, grid: list[int], trainer: Trainer, scans: dict, measurer: _Measurer) -> dict:
    """The saved measurements as one JSON-ready dict: per-method series, Adam-vs-isotropic gains,
    held-out losses, the cutoff scans with their fitted slopes, D and timings."""
    series = {m: [json.loads(measurement_path(out, f"step_{s:06d}_{m}").read_text()) for s in measurer.steps[m]] for m in METHODS}
    losses = [json.loads(measurement_path(out, f"step_{s:06d}_heldout").read_text()) for s in grid]
    dim = sum(p.numel() for p in trainer.model.parameters())
    by_step = {r["step"]: r for r in series["isotropic"]}
    gains = []
    for adam in series["adam"]:
        iso = by_step[adam["step"]]
        nats = adam["log_volume"] - iso["log_volume"]
        gains.append({
            "step": adam["step"], "nats": nats, "log10": nats / math.log(10), "per_parameter_log10": nats / math.log(10) / dim,
            "relative": nats / abs(iso["log_volume"]), "separated": adam["interval"][0] > iso["interval"][1],
        })
    scan = {m: {"records": recs, **scan_slope(recs)} for m, recs in scans.items()}
    timing = {
        "train_seconds": trainer.train_seconds,
        "estimate_seconds": {m: sum(r["wall_seconds"] for r in series[m]) for m in METHODS},
        "scan_seconds": {m: recs[0]["wall_seconds"] for m, recs in scans.items()},
    }
    return {
        "dim": dim, "half_dim": dim / 2, "cutoff": CUTOFF, "preconditioner_eps": PRECONDITIONER_EPS,
        "series": series, "gains": gains, "heldout_losses": losses, "train_losses": trainer.losses,
        "cutoff_scan": scan, "timing": timing,
    }


def scan_slope(records: list[dict], max_cutoff: float = CUTOFF) -> dict:
    """Least-squares slope of log V (nats) against ln eps over the finite points with cutoff <= ``max_cutoff``
    (the quadratic regime, where log V ~ (D/2) ln eps + const), and the slope between each neighbouring pair."""
    points = sorted((math.log(r["cutoff"]), r["log_volume"]) for r in records if math.isfinite(r["log_volume"]))
    fit_points = sum(1 for r in records if r["cutoff"] <= max_cutoff and math.isfinite(r["log_volume"]))
    local = [
        {"from": math.exp(x0), "to": math.exp(x1), "slope": (y1 - y0) / (x1 - x0)}
        for (x0, y0), (x1, y1) in itertools.pairwise(points)
    ]
    slope = quadratic_slope(records, max_cutoff=max_cutoff)
    return {"slope": slope, "fit_max_cutoff": max_cutoff, "fit_points": fit_points, "local_slopes": local}
