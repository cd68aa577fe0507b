"""The ``localvol`` command line: ``demo``, ``reproduce digits`` and ``estimate``.

    localvol demo [--out DIR] [--n-samples N] [--steps S] [--quiet]
    localvol reproduce digits [--out DIR] [--quick] [--quiet]
    localvol estimate (--model DIR | --factory module:function) [--data FILE] [options] --out result.json

Exit codes: 0 success; 2 bad usage or input (a message on stderr, no traceback); 1 a runtime failure
(``--debug`` prints its traceback); 130 interrupted (Ctrl-C). ``--quiet`` hides progress bars.

Files written:
- ``demo``: ``demo.json`` = {"format": "localvol_fast.demo", "settings", "table": [one row per method],
  "results": {method: ``VolumeResult.to_dict()``}} (``load_demo_results(path)`` gives the
  ``VolumeResult``s back) and ``demo.png`` (histograms of the per-direction estimates).
- ``reproduce digits``: ``report.md``, ``results.json`` and PNG plots (see ``reproduce``).
- ``estimate``: the ``VolumeResult`` as JSON (``VolumeResult.load(path)``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_METHODS = ("isotropic", "adam", "fisher")


class UsageError(Exception):
    """Bad command-line input (paths, factories, option values): exit code 2."""


# ----- argument types ---------------------------------------------------------------------------
def _finite_float(text: str, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        wanted = "a finite number >= 0" if zero_allowed else "a finite positive number"
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, zero_allowed=False)


def _non_negative_float(text: str) -> float:
    return _finite_float(text, zero_allowed=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that names the program in errors and exits with code 2 (its own convention too)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="hide progress bars and notes")
    common.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (demo/reproduce default 1: the digits MLP is too small to gain from more; "
        "estimate default: torch's own)",
    )
    common.add_argument("--debug", action="store_true", help="print the traceback of a runtime failure")

    parser = _Parser(prog="localvol", description="Local volume of trained neural networks (log volume in nats).")
    parser.add_argument("--version", action="version", version=f"localvol_fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train the paper's digits MLP and estimate its volume three ways",
        description="Train the paper's digits MLP in-process and estimate its KL-neighborhood volume at eps with "
        "isotropic, Adam- and Fisher-preconditioned directions under the Gaussian prior sigma = 1/sqrt(5e-4 * 1024). "
        "Writes demo.json and demo.png.",
    )
    demo.add_argument("--out", default="localvol_out", help="output folder (default: localvol_out/)")
    demo.add_argument("--n-samples", type=_positive_int, default=128, help="directions per method (default 128)")
    demo.add_argument("--steps", type=_positive_int, default=500, help="training steps (default 500)")
    demo.add_argument("--cutoff", type=_positive_float, default=1e-2, help="KL cutoff eps in nats (default 1e-2)")
    demo.add_argument("--seed", type=int, default=0, help="training and direction seed (default 0)")
    demo.set_defaults(handler=command_demo, default_threads=1)

    reproduce = commands.add_parser(
        "reproduce",
        parents=[common],
        help="reproduce the paper's experiments",
        description="Run the paper's experiments and compare with its figures: volume over training, clean vs "
        "40%% label-poisoned, isotropic vs Adam vs Fisher over an eps sweep, cutoff scan 1e-6 .. 1e2. Writes "
        "report.md, results.json and plots.",
    )
    reproduce.add_argument("experiment", choices=["digits"], help="which experiments (digits: the paper's MLP)")
    reproduce.add_argument("--out", default=None, help="output folder (default: localvol_out/reproduce_digits)")
    reproduce.add_argument("--quick", action="store_true", help="small sizes, about a minute (noisy)")
    reproduce.add_argument("--n-samples", type=_positive_int, default=None, help="directions per estimate")
    reproduce.add_argument("--seed", type=int, default=0)
    reproduce.set_defaults(handler=command_reproduce, default_threads=1)

    est = commands.add_parser(
        "estimate",
        parents=[common],
        help="estimate the local volume of a model",
        description="Estimate the local volume of a local Hugging Face causal LM (--model DIR with --data) or of "
        "the (model, data) a Python factory returns (--factory module:function). Prints the summary and writes the "
        "result as JSON (VolumeResult.load).",
    )
    source = est.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="DIR", help="a save_pretrained directory (AutoModelForCausalLM, no downloads)"
    )
    source.add_argument(
        "--factory",
        metavar="MODULE:FUNCTION",
        help="imported (the current directory is searched) and called with no arguments; returns (model, data), "
        "(model, data, extras) or a dict with model, data and optionally optimizer, loss_fn",
    )
    est.add_argument(
        "--data",
        metavar="FILE",
        help="with --model: a text file (one example per line, tokenized with the model directory's tokenizer) "
        "or a .pt tensor of token ids (N, T) or dict with input_ids / attention_mask",
    )
    est.add_argument("--out", required=True, metavar="FILE", help="where to write the result (JSON)")
    est.add_argument("--neighborhood", choices=["kl", "loss"], default="kl")
    est.add_argument("--cutoff", type=_positive_float, default=1e-2, help="eps (nats for kl; default 1e-2)")
    est.add_argument("--n-samples", type=_positive_int, default=100, help="directions (default 100)")
    est.add_argument("--measure", choices=["gaussian", "uniform"], default="gaussian")
    est.add_argument(
        "--sigma", type=_positive_float, default=None, help="Gaussian scale (default: RMS of the parameters)"
    )
    est.add_argument("--bounds", type=_positive_float, default=None, help="uniform prior on [-a, a]^D")
    est.add_argument("--preconditioner", choices=["none", "adam", "fisher"], default="none")
    est.add_argument(
        "--optimizer-state",
        metavar="FILE",
        help="torch.save'd Adam state_dict() of the model (for --preconditioner adam)",
    )
    est.add_argument("--preconditioner-exponent", type=_positive_float, default=0.5)
    est.add_argument("--preconditioner-eps", type=_non_negative_float, default=1e-5)
    est.add_argument("--fisher-passes", type=_positive_int, default=16)
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--rtol", type=_open_fraction, default=1e-2, help="radius tolerance |C - eps| <= rtol eps")
    est.add_argument("--batch-size", type=_positive_int, default=None, help="directions searched together")
    est.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    est.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default 128)")
    est.add_argument(
        "--attn-implementation",
        default="eager",
        help="attention kernel for --model (default eager: it batches under vmap, sdpa falls back to a slow loop)",
    )
    est.add_argument("--params", nargs="+", metavar="NAME", help="perturb only these named parameters")
    est.add_argument("--no-vmap", action="store_true", help="evaluate probes one at a time")
    est.add_argument(
        "--evaluation", choices=["auto", "vmap", "sequential", "inplace"], default="auto",
        help="how probes run (default auto: in place for large models and on CPUs, vmap otherwise)",
    )
    est.add_argument(
        "--anchor-cache", choices=["auto", "device", "cpu", "recompute"], default="auto",
        help="where the anchor's outputs are kept (default auto: the device while they fit the budget)",
    )
    est.add_argument("--memory-budget-gib", type=_positive_float, default=None, help="device memory for the anchor cache")
    est.add_argument("--data-batch-size", type=_positive_int, default=None, help="examples per forward pass")
    est.add_argument("--journal", metavar="FILE", default=None, help="append finished directions to FILE (JSON lines)")
    est.add_argument("--resume", action="store_true", help="continue the run in --journal, skipping finished directions")
    est.add_argument(
        "--distributed", action="store_true",
        help="shard directions over the processes of torchrun (each rank loads the model; rank 0 writes --out)",
    )
    est.set_defaults(handler=command_estimate, default_threads=None)
    return parser


# ----- helpers ----------------------------------------------------------------------------------
def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _output_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {text}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {text}: cannot create the folder ({error.strerror or error})") from None
    return path


def _output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--out {text}: is a folder; give a file name such as result.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {text}: cannot create its folder ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def _threads(count):
    """Run with ``count`` torch threads (None: leave torch's setting), restoring it afterwards."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _status_note(name: str, result) -> str | None:
    counts = {k: v for k, v in result.status_counts().items() if k != "converged"}
    if not counts:
        return None
    parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return (
        f"{name}: {parts} of {result.n_samples} directions (unbounded rays are integrated exactly to the prior's reach)"
    )


def _require_demo_extras() -> None:
    """Fail before any training when the demo's optional dependencies are missing."""
    for module, purpose in (("sklearn", "the digits data"), ("matplotlib", "the plots")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(f"{purpose} need {module}: pip install 'localvol_fast[demo]'") from None


# ----- demo -------------------------------------------------------------------------------------
def demo_row(method: str, result, seconds: float) -> dict:
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


def load_demo_results(path) -> dict:
    """{method: VolumeResult} from a ``demo.json``."""
    from .result import VolumeResult

    data = json.loads(Path(path).read_text())
    if data.get("format") != "localvol_fast.demo":
        raise ValueError(f"{path} is not a localvol demo.json (format {data.get('format')!r})")
    return {name: VolumeResult.from_dict(value) for name, value in data["results"].items()}


def command_demo(args) -> int:
    import torch

    from . import __version__
    from .digits import PRIOR_SIGMA, train_digits
    from .models import estimate
    from .plots import plot_estimate_histograms
    from .reproduce import method_options

    _require_demo_extras()
    out = _output_dir(args.out)
    started = time.perf_counter()
    _say(args, f"training the digits MLP ({args.steps} full-batch Adam steps) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # train_digits logs float() of a grad-tracking loss
        run = train_digits(args.steps, seed=args.seed)
    train_seconds = time.perf_counter() - started
    accuracy = run.accuracy()
    _say(args, f"trained in {train_seconds:.1f} s; test accuracy {accuracy:.3f}")
    results, rows, notes = {}, [], []
    for k, method in enumerate(DEMO_METHODS, 1):
        _say(args, f"[{k}/{len(DEMO_METHODS)}] {method} directions")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # direction statuses are reported below instead
            result = estimate(
                run.model,
                run.x_train,
                cutoff=args.cutoff,
                n_samples=args.n_samples,
                sigma=PRIOR_SIGMA,
                seed=args.seed,
                progress=not args.quiet,
                **method_options(run, method, args.cutoff),
            )
        results[method] = result
        rows.append(demo_row(method, result, time.perf_counter() - t0))
        note = _status_note(method, result)
        if note:
            notes.append(note)
    dim = results[DEMO_METHODS[0]].dim
    # Files first: a closed stdout (`localvol demo | head`) must not lose them.
    png = plot_estimate_histograms(
        {m: results[m] for m in DEMO_METHODS},
        out / "demo.png",
        title=f"Digits MLP (D = {dim:,}): per-direction log estimates, eps = {args.cutoff:g}",
    )
    document = {
        "format": "localvol_fast.demo",
        "version": __version__,
        "settings": {
            "steps": args.steps,
            "n_samples": args.n_samples,
            "cutoff": args.cutoff,
            "seed": args.seed,
            "sigma": PRIOR_SIGMA,
            "dim": dim,
            "test_accuracy": accuracy,
            "train_seconds": train_seconds,
            "threads": torch.get_num_threads(),
        },
        "table": rows,
        "results": {m: r.to_dict() for m, r in results.items()},
        "seconds": time.perf_counter() - started,
    }
    path = out / "demo.json"
    path.write_text(json.dumps(document, indent=1))
    for note in notes:
        _say(args, f"note: {note}")
    print(
        f"digits MLP (D = {dim:,}, {args.steps} steps, test accuracy {accuracy:.3f}): "
        f"KL neighborhood eps = {args.cutoff:g}, Gaussian prior sigma = {PRIOR_SIGMA:.4g}, "
        f"{args.n_samples} directions per method"
    )
    print(format_table(rows))
    print(f"wrote {path} and {png} ({document['seconds']:.1f} s in all)")
    return EXIT_OK


# ----- reproduce --------------------------------------------------------------------------------
def command_reproduce(args) -> int:
    from .reproduce import reproduce_digits

    _require_demo_extras()
    out = _output_dir(args.out or os.path.join("localvol_out", f"reproduce_{args.experiment}"))
    _say(args, f"reproducing the paper's digits experiments ({'quick' if args.quick else 'default'} sizes) into {out}")
    results = reproduce_digits(out, quick=args.quick, n_samples=args.n_samples, seed=args.seed, progress=not args.quiet)
    print(f"comparison with the paper (details in {out / 'report.md'}):")
    for finding in results["paper_comparison"]:
        print(f"  {finding['verdict'].upper():9s} {finding['claim']}")
        print(f"            ours: {finding['ours']}")
    print(
        f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} plots ({results['seconds']:.1f} s)"
    )
    return EXIT_OK


# ----- estimate ---------------------------------------------------------------------------------
def load_factory(spec: str):
    """Import ``module:function`` and call it; returns (model, data, extras dict)."""
    import torch

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise UsageError(f"--factory must look like module:function (e.g. mypackage.models:build), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a factory next to the user is found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"--factory {spec}: cannot import module {module_name!r} ({error})") from None
    except Exception as error:  # noqa: BLE001 - any failure while importing user code is a bad factory
        raise UsageError(
            f"--factory {spec}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--factory {spec}: module {module_name!r} has no function {function_name!r}")
    built = function()
    extras = {}
    if isinstance(built, dict):
        built = dict(built)
        missing = [k for k in ("model", "data") if k not in built]
        if missing:
            raise UsageError(f"--factory {spec} returned a dict without {missing}")
        model, data = built.pop("model"), built.pop("data")
        extras = built
    elif isinstance(built, (tuple, list)) and len(built) in (2, 3):
        model, data = built[0], built[1]
        extras = dict(built[2]) if len(built) == 3 else {}
    else:
        raise UsageError(
            f"--factory {spec} must return (model, data), (model, data, extras) or a dict; got {type(built).__name__}"
        )
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--factory {spec} returned a {type(model).__name__} as the model; expected a torch.nn.Module")
    unknown = sorted(set(extras) - {"optimizer", "loss_fn"})
    if unknown:
        raise UsageError(f"--factory {spec}: unknown extras {unknown}; allowed: optimizer, loss_fn")
    return model, data, extras


def load_hf_model(directory: str, attn_implementation: str | None = "eager"):
    path = Path(directory)
    if not path.exists():
        raise UsageError(f"--model {directory}: no such folder")
    if not path.is_dir():
        raise UsageError(f"--model {directory}: not a folder (give a save_pretrained directory)")
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {directory}: no config.json, so not a Hugging Face model folder (see save_pretrained)"
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        raise ImportError("--model needs transformers: pip install 'localvol_fast[hf]'") from error
    try:
        options = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--model {directory}: cannot load a causal language model: {error}") from None
    return model.eval()


def _ids_from_object(obj, source: str, max_length: int) -> dict:
    import torch

    if isinstance(obj, torch.Tensor):
        ids, mask = obj, None
    elif isinstance(obj, dict) and isinstance(obj.get("input_ids"), torch.Tensor):
        ids, mask = obj["input_ids"], obj.get("attention_mask")
    else:
        raise UsageError(
            f"--data {source}: expected a tensor of token ids or a dict with 'input_ids', got {type(obj).__name__}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsageError(f"--data {source}: token ids must be integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise UsageError(f"--data {source}: token ids must be (N, T) or (T,), got shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
    return {"input_ids": ids[:, :max_length].long(), "attention_mask": mask[:, :max_length].long()}


def load_token_data(data_path: str, model_dir: str, max_length: int) -> dict:
    """input_ids and attention_mask from a .pt file or a text file (one example per line)."""
    import torch

    path = Path(data_path)
    if not path.is_file():
        raise UsageError(f"--data {data_path}: no such file")
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
            raise UsageError(f"--data {data_path}: cannot read it as a torch file ({error})") from None
        return _ids_from_object(obj, data_path, max_length)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--data {data_path}: cannot read it as UTF-8 text ({error})") from None
    if not lines:
        raise UsageError(f"--data {data_path}: the file has no non-empty lines")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"--data {data_path} is text, but {model_dir} has no usable tokenizer ({error}); save one with "
            "tokenizer.save_pretrained(DIR) or pass a .pt tensor of token ids"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in {model_dir} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the cost anyway
    encoded = tokenizer(lines, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def causal_lm_loss(outputs, labels):
    """Mean next-token cross-entropy over unmasked positions (labels -100 are ignored)."""
    import torch

    from .neighborhoods import output_logits

    logits = output_logits(outputs)[..., :-1, :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels[..., 1:].reshape(-1), ignore_index=-100
    )


def _default_loss(outputs, targets):
    import torch

    from .neighborhoods import output_logits

    return torch.nn.functional.cross_entropy(output_logits(outputs), targets)


def _check_device(text):
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    return device


def command_estimate(args) -> int:
    import torch

    from .models import estimate

    out = _output_file(args.out)
    device = _check_device(args.device)
    if args.distributed and device is not None and str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # one GPU per torchrun process
    if args.model is not None:
        if args.data is None:
            raise UsageError("--model needs --data (a text file or a .pt tensor of token ids)")
        model = load_hf_model(args.model, args.attn_implementation)
        data = load_token_data(args.data, args.model, args.max_length)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and int(data["input_ids"].max()) >= vocab:
            raise UsageError(
                f"--data {args.data}: token id {int(data['input_ids'].max())} is outside the model's vocabulary of {vocab}"
            )
        extras = {}
        if args.neighborhood == "loss":
            data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
            extras["loss_fn"] = causal_lm_loss
    else:
        if args.data is not None:
            raise UsageError("--data goes with --model; a --factory returns its own data")
        model, data, extras = load_factory(args.factory)
    loss_fn = extras.get("loss_fn")
    if args.neighborhood == "loss" and loss_fn is None:
        loss_fn = _default_loss
    optimizer = extras.get("optimizer")
    if args.optimizer_state is not None:
        try:
            optimizer = torch.load(args.optimizer_state, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
            raise UsageError(f"--optimizer-state {args.optimizer_state}: cannot read it ({error})") from None
    if args.preconditioner == "adam" and optimizer is None:
        raise UsageError(
            "--preconditioner adam needs the model's Adam state: --optimizer-state FILE (torch.save(optimizer.state_dict(), "
            "FILE)) or a factory returning an optimizer"
        )
    options = {
        "neighborhood": args.neighborhood,
        "loss_fn": loss_fn if args.neighborhood == "loss" else None,
        "cutoff": args.cutoff,
        "n_samples": args.n_samples,
        "measure": args.measure,
        "sigma": args.sigma,
        "bounds": args.bounds,
        "preconditioner": None if args.preconditioner == "none" else args.preconditioner,
        "optimizer": optimizer if args.preconditioner == "adam" else None,
        "params": args.params,
        "seed": args.seed,
        "rtol": args.rtol,
        "batch_size": args.batch_size,
        "progress": not args.quiet,
        "device": device,
        "preconditioner_exponent": args.preconditioner_exponent,
        "preconditioner_eps": args.preconditioner_eps,
        "fisher_passes": args.fisher_passes,
        "use_vmap": not args.no_vmap,
        "evaluation": args.evaluation,
        "anchor_cache": args.anchor_cache,
        "memory_budget": None if args.memory_budget_gib is None else args.memory_budget_gib * 2**30,
        "data_batch_size": args.data_batch_size,
        "output": args.journal,
        "resume": args.resume,
        "distributed": args.distributed,
    }
    if args.resume and args.journal is None:
        raise UsageError("--resume needs --journal FILE (the journal of the run to continue)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the summary lists direction statuses and notes
        try:
            result = estimate(model, data, **options)
        except (ValueError, TypeError, FileExistsError) as error:
            raise UsageError(f"invalid input: {error}") from None
    source = args.model if args.model is not None else args.factory
    result.config["source"] = source
    if args.distributed and _rank() != 0:
        return EXIT_OK  # every rank holds the whole result; rank 0 reports and writes it
    print(result.summary())
    result.save(out)
    print(f"wrote {out}")
    return EXIT_OK


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----- entry point ------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad usage/input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help / --version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else (EXIT_OK if stop.code is None else EXIT_USAGE)
    threads = args.threads if args.threads is not None else args.default_threads
    try:
        with _threads(threads):
            return args.handler(args)
    except UsageError as error:
        print(f"localvol: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nlocalvol: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`localvol ... | head`): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the command line reports every failure as exit code 1
        if args.debug:
            traceback.print_exc()
        message = str(error).splitlines()[0] if str(error) else ""
        print(f"localvol: error: {type(error).__name__}: {message}", file=sys.stderr)
        if not args.debug:
            print("localvol: (run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
