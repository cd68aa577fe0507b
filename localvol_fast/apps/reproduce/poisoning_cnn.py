"""The paper's ConvNeXt finding on a small CNN: a label-poisoned, badly generalizing network has a smaller
local volume than a clean one (MATH.md: log10 -8.1e6 poisoned vs -6.1e6 clean, isotropic, D = 3,388,810).

Network: the digits images as 1 x 8 x 8 (scikit-learn's bundled ``load_digits``, pixels / 16, the seeded
1,024 / 773 split of ``digits.load_digits_split``) through conv 3x3 (1 -> 8, padding 1), tanh-GELU,
conv 3x3 stride 2 (8 -> 16, padding 1), tanh-GELU, linear 256 -> 10: D = 3,818. Weights and biases are
drawn N(0, 1/fan_in) (fan_in = in_channels * 3 * 3 for a conv), as the paper's digits MLP.
Training: the paper's digits recipe unchanged (``digits.PaperAdam``, lr 0.05 cosine-decayed over 400
minibatch steps of 64, 25 reshuffled epochs, loss mean CE + 0.5 * 5e-4 |theta|^2, ``digits.paper_loss``).
Poisoning: as ``experiments.poisoning`` does for the MLP, a fraction (0.4) of the training labels is
replaced by a random different class (``digits.poison_labels``); test labels stay clean.
Volume: mean KL(anchor || perturbed) over the 1,024 training inputs <= cutoff 1e-2, under the Gaussian
prior N(0, sigma^2 I) about the origin with sigma = ``digits.PRIOR_SIGMA`` = 1/sqrt(5e-4 * 1,024):
the prior whose negative log density is the training loss's L2 term (summed over the training set), so
the volume is measured under the prior the network was trained with, and the figures are comparable
with the digits MLP's. Methods: isotropic directions and Adam's (raw second moment, eps 1e-3, the
digits experiments' choice). All log volumes in nats.

``reproduce_poisoning`` writes results.json after every estimate and resumes from it; the report and
the plot come from ``poisoning_report``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from localvol_fast import __version__
from localvol_fast.apps.digits import (
    PAPER_STEPS,
    PRIOR_SIGMA,
    PaperAdam,
    TrainedDigits,
    load_digits_split,
    paper_minibatch_steps,
    poison_labels,
)
from localvol_fast.apps.reproduce.experiments import DIRECTION_SEED, GOOD_ADAM_EPS, method_options, record_of
from localvol_fast.apps.reproduce.poisoning_report import paper_comparison, poisoning_verdicts, write_plot, write_report
from localvol_fast.core.checks import check_flag, check_integer, check_sample_count, check_seed
from localvol_fast.engine.progress import ProgressBar
from localvol_fast.nn.costs.choice import default_evaluation
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.parameters import ParameterLayout

FORMAT = "localvol_fast.reproduce.poisoning"
KINDS = ("clean", "poisoned")
METHODS = ("isotropic", "adam")
TIMED_EVALUATIONS = ("vmap", "inplace", "sequential")  # "auto" resolves to one of them (recorded)
CHANNELS = (8, 16)


def settings(quick: bool = False) -> dict:
    """The run's sizes (the default run, or ``quick``); every entry must match for a resume."""
    return {
        "quick": quick, "seeds": [0, 1] if quick else [0, 1, 2], "n_samples": 32 if quick else 512,
        "poison_fraction": 0.4, "cutoff": 1e-2, "methods": list(METHODS), "adam_eps": GOOD_ADAM_EPS,
        "sigma": PRIOR_SIGMA, "channels": list(CHANNELS), "steps": PAPER_STEPS, "direction_seed": DIRECTION_SEED,
        # Timing the evaluation paths costs about as much as two estimates: quick runs skip it and take
        # the library's own choice, evaluation="auto" (report.md says which path ran and why).
        "timing_n_samples": None if quick else 64,
    }


def digits_cnn(seed: int = 0, channels: tuple[int, int] = CHANNELS) -> torch.nn.Sequential:
    """The CNN of the module docstring on flat (N, 64) inputs (it unflattens them to (N, 1, 8, 8)), with
    weights and biases N(0, 1/fan_in) from a seeded generator. Output: (N, 10) logits."""
    first, second = channels
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, first, 3, padding=1), torch.nn.GELU(approximate="tanh"),
        torch.nn.Conv2d(first, second, 3, stride=2, padding=1), torch.nn.GELU(approximate="tanh"),
        torch.nn.Flatten(), torch.nn.Linear(second * 4 * 4, 10),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                std = 1.0 / math.sqrt(layer.weight[0].numel())  # fan_in: one output unit's weights
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * std)
    return model


@functools.lru_cache(maxsize=16)
def train_cnn(
    seed: int = 0, poison_fraction: float = 0.0, channels: tuple[int, int] = CHANNELS, steps: int = PAPER_STEPS
) -> TrainedDigits:
    """The CNN trained with the paper's digits recipe on the split of ``seed`` (labels poisoned first when
    ``poison_fraction`` > 0), as ``digits.train_paper_digits`` trains the MLP (``steps`` < 400 shortens the
    cosine schedule itself, for tests); memoized (``estimate`` gives the model back exactly, so runs can
    share it). A few seconds on a CPU."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    if poison_fraction:
        y_train = poison_labels(y_train, poison_fraction, seed)
    model = digits_cnn(seed, channels)
    optimizer = PaperAdam(model.parameters(), total_steps=steps)
    paper_minibatch_steps(model, optimizer, x_train, y_train, seed=seed, steps=steps)
    return TrainedDigits(model, optimizer, x_train, y_train, x_test, y_test)


def cnn_volume(run: TrainedDigits, method: str, config: dict, *, n_samples: int, evaluation: str):
    """One KL-neighborhood ``VolumeResult`` (nats) of a trained CNN under the prior N(0, sigma^2 I)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unbounded directions are counted in ``status``
        return estimate(
            run.model, run.x_train, cutoff=config["cutoff"], n_samples=n_samples, sigma=config["sigma"],
            seed=config["direction_seed"], progress=False, evaluation=evaluation,
            **method_options(run, method, config["adam_eps"]),
        )


def time_evaluations(run: TrainedDigits, config: dict, repeats: int = 1) -> dict:
    """Seconds of a small isotropic estimate (``timing_n_samples`` directions) with each evaluation path,
    the best of ``repeats`` interleaved rounds (the machine is shared: the minimum is the least disturbed),
    after a 2-direction warm-up of each (the first vmap call pays one-off setup that is not its speed).
    Returns {"seconds": {mode: s}, "fastest": mode, "auto_resolves_to": mode, "n_samples": n}."""
    seconds = {mode: math.inf for mode in TIMED_EVALUATIONS}
    n = config["timing_n_samples"]
    for mode in TIMED_EVALUATIONS:
        cnn_volume(run, "isotropic", config, n_samples=2, evaluation=mode)
    for _ in range(repeats):
        for mode in TIMED_EVALUATIONS:
            started = time.perf_counter()
            cnn_volume(run, "isotropic", config, n_samples=n, evaluation=mode)
            seconds[mode] = min(seconds[mode], time.perf_counter() - started)
    layout = ParameterLayout(run.model.named_parameters())
    auto = default_evaluation(run.model, layout, None, True)
    return {"seconds": seconds, "fastest": min(seconds, key=seconds.get), "auto_resolves_to": auto, "n_samples": n}


def network_facts(run: TrainedDigits) -> dict:
    """Accuracies (training accuracy against the labels it was trained on), D and |theta0|^2."""
    return {
        "train_accuracy": run.accuracy(run.x_train, run.y_train), "test_accuracy": run.accuracy(),
        "dim": sum(p.numel() for p in run.model.parameters()),
        "anchor_norm_squared": float(sum(p.detach().double().pow(2).sum() for p in run.model.parameters())),
    }


def _checked_arguments(out, quick, seeds, n_samples, progress) -> tuple[Path, dict, bool]:
    """(out directory, settings, progress) from the public arguments, each checked with a clear error."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (str or pathlib.Path), got {out!r} ({type(out).__name__})")
    config = settings(check_flag(quick, "quick"))
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise TypeError(f"seeds must be a list of integer training seeds such as [0, 1, 2], got {seeds!r}")
        seeds = [check_seed(s) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct training seeds, got {seeds!r}")
        config["seeds"] = seeds
    if n_samples is not None:
        # Two directions at least: the bootstrap interval resamples them.
        config["n_samples"] = check_sample_count(check_integer(n_samples, "n_samples", minimum=2, what="directions per estimate"))
        if config["timing_n_samples"] is not None:
            config["timing_n_samples"] = min(config["timing_n_samples"], config["n_samples"])
    return Path(out), config, check_flag(progress, "progress")


def _resumed(path: Path, config: dict) -> dict | None:
    """The results of an earlier run with the same settings in ``path`` (None when there is none); a
    ValueError naming every differing setting when they differ."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it or choose another out directory") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} does not hold poisoning results (format {FORMAT!r}); choose another out directory")
    old = saved.get("settings", {})
    differ = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{path} was written with other settings ({shown}); rerun with the saved settings to resume it, "
            "or choose another out directory (or delete results.json) to start afresh"
        )
    return saved


def _save(results: dict, path: Path) -> None:
    """results.json, replaced atomically: an interruption leaves the previous complete file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


def _key(seed: int, kind: str, method: str) -> str:
    return f"seed {seed} {kind} {method}"


def reproduce_poisoning(out, *, quick: bool = False, seeds=None, n_samples=None, progress: bool = True) -> dict:
    """Clean vs label-poisoned CNNs over training ``seeds`` (default [0, 1, 2]; quick [0, 1]), each with
    isotropic and Adam directions (``n_samples`` each; default 512, quick 32). Writes out/results.json
    (after every estimate; a rerun with the same settings skips the finished ones, other settings are a
    ValueError), out/report.md and out/poisoning.png. Returns the results dict (what results.json holds)."""
    out, config, progress = _checked_arguments(out, quick, seeds, n_samples, progress)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    started = time.perf_counter()
    saved = _resumed(path, config)
    results = saved or {"format": FORMAT, "settings": config, "networks": {}, "runs": {}, "seconds_spent": 0.0}
    results["resumed"] = bool(saved and saved["runs"])
    spent_before = results["seconds_spent"]
    results.update(version=__version__, torch=torch.__version__, threads=torch.get_num_threads())
    todo = [(s, k, m) for s in config["seeds"] for k in KINDS for m in config["methods"] if _key(s, k, m) not in results["runs"]]
    bar = ProgressBar(len(todo) + ("evaluation_timing" not in results), label="estimates", enabled=progress)
    if "evaluation_timing" not in results:
        results["evaluation_timing"] = _timing(config)  # before any run: they all use its choice
        bar.update(1, run="timing", fastest=results["evaluation_timing"]["fastest"])
        _save(results, path)
    evaluation = results["evaluation_timing"]["fastest"]
    for seed, kind, method in todo:
        run = _trained(config, seed, kind)
        facts = results["networks"].setdefault(f"seed {seed} {kind}", network_facts(run))
        result = cnn_volume(run, method, config, n_samples=config["n_samples"], evaluation=evaluation)
        fields = {"seed": seed, "kind": kind, "method": method, "evaluation": evaluation, **facts}
        results["runs"][_key(seed, kind, method)] = record_of(result, keep_estimates=False, **fields)
        results["seconds_spent"] = spent_before + time.perf_counter() - started
        _save(results, path)
        bar.update(1, run=f"{kind}_{seed}_{method}", log_volume=result.log_volume)
    bar.close()
    return _finish(results, out, spent_before + time.perf_counter() - started)


def _timing(config: dict) -> dict:
    """``time_evaluations`` on the first seed's clean network, or (quick: no timing) what "auto" picks."""
    run = _trained(config, config["seeds"][0], "clean")
    if config["timing_n_samples"] is None:
        auto = default_evaluation(run.model, ParameterLayout(run.model.named_parameters()), None, True)
        return {"seconds": {}, "fastest": auto, "auto_resolves_to": auto, "n_samples": None}
    return time_evaluations(run, config, repeats=2)


def _trained(config: dict, seed: int, kind: str) -> TrainedDigits:
    fraction = config["poison_fraction"] if kind == "poisoned" else 0.0
    return train_cnn(int(seed), float(fraction), tuple(config["channels"]), int(config["steps"]))


def _finish(results: dict, out: Path, seconds: float) -> dict:
    """Verdicts, plot and report from the finished runs; results.json written last."""
    config = results["settings"]
    runs = [results["runs"][_key(s, k, m)] for s in config["seeds"] for k in KINDS for m in config["methods"]]
    results["verdicts"] = poisoning_verdicts(runs, config["methods"])
    results["paper_comparison"] = paper_comparison(results["verdicts"])
    results["seconds_spent"] = seconds
    results["plot"] = str(write_plot(runs, config["methods"], out / "poisoning.png"))
    results["report"] = str(write_report(results, runs, out / "report.md"))
    _save(results, out / "results.json")
    return results
