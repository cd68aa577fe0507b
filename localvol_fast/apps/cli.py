"""The ``localvol`` command line: ``demo``, ``reproduce digits`` and ``estimate``.

    localvol demo [--out DIR] [--n-samples N] [--steps S] [--quiet]
    localvol reproduce digits|lm|poisoning [--out DIR] [--quick] [--quiet]
    localvol estimate (--model DIR | --factory module:function) [--data FILE] [options] --out result.json

Exit codes: 0 success; 2 bad usage or input (a message on stderr, no traceback); 1 a runtime failure
(``--debug`` prints its traceback); 130 interrupted (Ctrl-C). ``--quiet`` hides progress bars.
Each command's work lives in its own module (``demo``, ``reproduce``, ``loaders``); the handlers here
only turn options into calls and results into output.

Files written:
- ``demo``: ``demo.json`` and ``demo.png`` (see ``apps.demo``).
- ``reproduce digits|lm|poisoning``: ``report.md``, ``results.json`` and PNG plots (see ``apps.reproduce``);
  ``lm`` and ``poisoning`` resume an interrupted run from the files already in ``--out``.
- ``estimate``: the ``VolumeResult`` as JSON (``VolumeResult.load(path)``; with ``--method sequential`` a
  ``SequentialResult``, ``SequentialResult.load(path)``). ``--out`` and ``--journal``
  are checked writable before the model is loaded; if writing ``--out`` still fails at the end, the
  result goes to a fallback file (next to the journal, else in the current folder), the path is printed
  and the exit code is 1: a finished run is never lost.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from localvol_fast import __version__
from localvol_fast.apps.demo import demo_headline, format_table, require_demo_extras, run_demo
from localvol_fast.apps.loaders import UsageError, default_loss, load_factory, load_hf_inputs
from localvol_fast.apps.reproduce import reproduce_digits, reproduce_lm, reproduce_poisoning
from localvol_fast.core.checks import check_device, check_integer, check_open_fraction, check_seed
from localvol_fast.core.search import INTEGRATED_EXACTLY, UNBOUNDED, status_counts_text
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.sequential import CURVATURE_NAMES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# ----- argument types ---------------------------------------------------------------------------
def _finite_float(text: str, zero_allowed: bool) -> float:
    """The one parser behind the float options: a finite number, > 0 (or >= 0 with ``zero_allowed``)."""
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


def _eps_or_auto(text: str) -> float | str:
    """--preconditioner-eps: a number >= 0, or "auto" (``estimate`` chooses it on pilot directions)."""
    return "auto" if text.strip().lower() == "auto" else _non_negative_float(text)


def _open_fraction(text: str) -> float:
    value = _positive_float(text)
    try:
        return check_open_fraction(value, "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}") from None


def _positive_int(text: str) -> int:
    # argparse names the option in front of the message, so the check's own message (which names
    # the value differently) is replaced by one about the text typed.
    try:
        return check_integer(int(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None


def _seed(text: str) -> int:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that names the program in errors and exits with code 2 (its own convention too)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ----- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="localvol", description="Local volume of trained neural networks (log volume in nats).")
    parser.add_argument("--version", action="version", version=f"localvol_fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    common = _common_options()
    # demo and reproduce default to 1 thread: the digits MLP is too small to gain from more.
    _add_demo(_add_command(commands, common, "demo", command_demo, _DEMO_TEXT, default_threads=1))
    _add_reproduce(_add_command(commands, common, "reproduce", command_reproduce, _REPRODUCE_TEXT, default_threads=1))
    _add_estimate(_add_command(commands, common, "estimate", command_estimate, _ESTIMATE_TEXT, default_threads=None))
    return parser


# (help in the command list, description in the command's --help)
_DEMO_TEXT = (
    "train the paper's digits MLP and estimate its volume three ways",
    "Train the paper's digits MLP in-process and estimate its KL-neighborhood volume at eps with "
    "isotropic, Adam- and Fisher-preconditioned directions under the Gaussian prior sigma = 1/sqrt(5e-4 * 1024). "
    "Writes demo.json and demo.png.",
)
_REPRODUCE_TEXT = (
    "reproduce the paper's experiments",
    "Run the paper's experiments and compare with its figures: volume over training, clean vs "
    "40%% label-poisoned, isotropic vs Adam vs Fisher over an eps sweep, cutoff scan 1e-6 .. 1e2. Writes "
    "report.md, results.json and plots.",
)
_ESTIMATE_TEXT = (
    "estimate the local volume of a model",
    "Estimate the local volume of a local Hugging Face causal LM (--model DIR with --data) or of "
    "the (model, data) a Python factory returns (--factory module:function). Prints the summary and writes the "
    "result as JSON (VolumeResult.load; --method sequential: SequentialResult.load).",
)


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes (a parent parser)."""
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
    return common


def _add_command(commands, common, name, handler, text: tuple[str, str], *, default_threads: int | None):
    """A sub-command's parser; ``default_threads`` is its torch thread count without --threads (None: torch's)."""
    help_text, description = text
    command = commands.add_parser(name, parents=[common], help=help_text, description=description)
    command.set_defaults(handler=handler, default_threads=default_threads)
    return command


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", default="localvol_out", help="output folder (default: localvol_out/)")
    demo.add_argument("--n-samples", type=_positive_int, default=128, help="directions per method (default 128)")
    demo.add_argument(
        "--steps", type=_positive_int, default=400,
        help="training steps of the paper's recipe (minibatches of 64; default and at most 400 = 25 epochs)",
    )
    demo.add_argument("--cutoff", type=_positive_float, default=1e-2, help="KL cutoff eps in nats (default 1e-2)")
    demo.add_argument("--seed", type=_seed, default=0, help="training and direction seed (default 0)")


def _add_reproduce(reproduce: argparse.ArgumentParser) -> None:
    reproduce.add_argument(
        "experiment", choices=sorted(EXPERIMENTS),
        help="which experiments (digits: the paper's MLP table; lm: a small GPT-NeoX trained on the Python standard "
        "library's sources, volume over training; poisoning: a small CNN on the digits images, clean vs poisoned)",
    )
    reproduce.add_argument("--out", default=None, help="output folder (default: localvol_out/reproduce_EXPERIMENT)")
    reproduce.add_argument("--quick", action="store_true", help="small sizes, a minute or two (noisy)")
    reproduce.add_argument("--n-samples", type=_positive_int, default=None, help="directions per estimate")
    reproduce.add_argument(
        "--seed", type=_seed, default=None,
        help="training seed (default 0; for poisoning, default: its three seeds 0, 1, 2)",
    )


def _add_estimate(est: argparse.ArgumentParser) -> None:
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
    _add_preconditioner_options(est)
    _add_method_options(est)
    est.add_argument("--seed", type=_seed, default=0)
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
    _add_execution_options(est)


def _add_preconditioner_options(est: argparse.ArgumentParser) -> None:
    est.add_argument("--preconditioner", choices=["none", "adam", "fisher"], default="none")
    est.add_argument(
        "--optimizer-state",
        metavar="FILE",
        help="torch.save'd Adam state_dict() of the model (for --preconditioner adam)",
    )
    est.add_argument("--preconditioner-exponent", type=_positive_float, default=0.5)
    est.add_argument(
        "--preconditioner-eps", type=_eps_or_auto, default=1e-5,
        help="additive eps of p = 1/(v^exponent + eps), or 'auto': chosen on pilot directions (default 1e-5)",
    )
    est.add_argument("--fisher-passes", type=_positive_int, default=16)


# The sequential method's flags (dest -> estimate's keyword), their defaults estimate's own; --method rays
# refuses any of them set otherwise.
_SEQUENTIAL_KEYWORDS = {"scope": "scope", "curvature": "curvature", "replicates": "n_replicates",
                        "moves_per_step": "moves_per_step", "start_cutoff": "start_cutoff",
                        "max_evaluations": "max_evaluations"}
_SEQUENTIAL_DEFAULTS = {
    flag: inspect.signature(estimate).parameters[keyword].default for flag, keyword in _SEQUENTIAL_KEYWORDS.items()
}


def _add_method_options(est: argparse.ArgumentParser) -> None:
    """Which estimator: the paper's rays, or the sequential (tempered SMC) method and its own options."""
    est.add_argument(
        "--method", choices=["rays", "sequential"], default="rays",
        help="rays: the paper's estimator (default; a lower bound in practice); sequential: tempered SMC, "
        "consistent, with a replicate interval (README, Accuracy)",
    )
    d = _SEQUENTIAL_DEFAULTS
    est.add_argument("--scope", choices=["local", "global"], default=d["scope"],
                     help="sequential: the anchor's own basin (default) or any basin, from the prior")
    est.add_argument("--curvature", choices=list(CURVATURE_NAMES), default=d["curvature"],
                     help="sequential: the quadratic surrogate's Hessian at the anchor (default auto)")
    est.add_argument("--replicates", type=_positive_int, default=d["replicates"],
                     help=f"sequential: independent populations of --n-samples particles (default {d['replicates']}; "
                     ">= 2 for an interval)")
    est.add_argument("--moves-per-step", type=_positive_int, default=d["moves_per_step"],
                     help=f"sequential: HMC moves after each step (default {d['moves_per_step']}; fewer lag, a bias low)")
    est.add_argument("--start-cutoff", type=_positive_float, default=d["start_cutoff"],
                     help="sequential, local: start from the surrogate at this larger cutoff (a bent neighborhood)")
    est.add_argument("--max-evaluations", type=_positive_int, default=d["max_evaluations"],
                     help="sequential: stop after this many cost evaluations (the result says it is incomplete)")


def _sequential_options(args) -> dict:
    """estimate's sequential keywords from the flags; with --method rays, none may be set (they would be ignored)."""
    given = {name: getattr(args, name) for name in _SEQUENTIAL_DEFAULTS}
    if args.method == "rays":
        changed = [name for name, value in given.items() if value != _SEQUENTIAL_DEFAULTS[name]]
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            verb = "applies" if len(changed) == 1 else "apply"
            raise UsageError(f"{flags} {verb} to --method sequential only; add --method sequential or leave them out")
        return {}
    return {_SEQUENTIAL_KEYWORDS[flag]: value for flag, value in given.items()}


def _add_execution_options(est: argparse.ArgumentParser) -> None:
    """How the estimate runs (not what it measures): evaluation, memory, journal, sharding."""
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
    est.add_argument("--journal", metavar="FILE", default=None,
                     help="rays: append finished directions to FILE (JSON lines); sequential: keep the run's latest state there")
    est.add_argument("--resume", action="store_true", help="continue the run in --journal, skipping finished directions")
    est.add_argument(
        "--distributed", action="store_true",
        help="shard directions over the processes of torchrun (each rank loads the model; rank 0 writes --out)",
    )


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
        with tempfile.NamedTemporaryFile(dir=path, prefix=".localvol-write-test-"):
            pass  # the folder takes files: found now, not after the run
    except OSError as error:
        raise UsageError(f"--out {text}: cannot create or write the folder ({error.strerror or error})") from None
    return path


def _writable_file(text: str, option: str) -> Path:
    """A file the command will write at the end: its folder is created and tried with a temporary
    file now, so that a run whose result could not be saved never starts."""
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{option} {text}: is a folder; give a file name such as result.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {text}: cannot create its folder ({error.strerror or error})") from None
    try:
        if path.exists():
            with open(path, "r+b"):  # opened for writing, nothing written
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".localvol-write-test-"):
                pass  # removed on close
    except OSError as error:
        raise UsageError(
            f"{option} {text}: cannot write there ({error.strerror or error}); choose a writable location"
        ) from None
    return path


def _output_file(text: str) -> Path:
    return _writable_file(text, "--out")


def _save_result(result, out: Path, journal: str | None) -> int:
    """Write the result to ``out``; if that fails, to a fallback file, saying where (exit code 1)."""
    try:
        result.save(out)
    except OSError as error:
        fallback = _save_fallback(result, out, journal)
        print(
            f"localvol: error: cannot write --out {out} ({error.strerror or error}); the result was saved to "
            f"{fallback} instead",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"wrote {out}")
    return EXIT_OK


def _save_fallback(result, out: Path, journal: str | None) -> Path:
    """Save to a new file next to the journal, else in the current folder, else in the temp folder."""
    folders = [Path(journal).resolve().parent] if journal is not None else []
    folders += [Path.cwd(), Path(tempfile.gettempdir())]
    for folder in folders:
        try:
            handle, name = tempfile.mkstemp(dir=folder, prefix=f"{out.stem}.", suffix=".json")
            os.close(handle)
            result.save(name)
        except OSError:
            continue
        return Path(name)
    raise OSError(f"the result could not be saved anywhere (tried {', '.join(map(str, folders))})")


@contextlib.contextmanager
def _threads(count):
    """Run with ``count`` torch threads (None: leave torch's setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _status_note(name: str, result) -> str | None:
    """The directions of ``result`` that did not simply converge, in the package's one status text."""
    counts = status_counts_text(result.status, {UNBOUNDED: INTEGRATED_EXACTLY})
    return f"{name}: {', '.join(counts)} of {result.n_samples} directions" if counts else None


def _check_device(text):
    """--device: one that exists here (the library's own check, reported as a usage error)."""
    try:
        return check_device(text)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----- demo and reproduce -----------------------------------------------------------------------
def command_demo(args) -> int:
    require_demo_extras()
    out = _output_dir(args.out)
    demo = run_demo(
        out,
        steps=args.steps,
        n_samples=args.n_samples,
        cutoff=args.cutoff,
        seed=args.seed,
        progress=not args.quiet,
        say=lambda message: _say(args, message),
    )
    for method, result in demo.results.items():
        note = _status_note(method, result)
        if note:
            _say(args, f"note: {note}")
    print(demo_headline(demo.document["settings"]))
    print(format_table(demo.rows))
    print(f"wrote {demo.json_path} and {demo.png_path} ({demo.document['seconds']:.1f} s in all)")
    return EXIT_OK


def command_reproduce(args) -> int:
    require_demo_extras()
    out = _output_dir(args.out or os.path.join("localvol_out", f"reproduce_{args.experiment}"))
    run, what = EXPERIMENTS[args.experiment]
    _say(args, f"reproducing {what} ({'quick' if args.quick else 'default'} sizes) into {out}")
    options = {"quick": args.quick, "n_samples": args.n_samples, "progress": not args.quiet}
    if args.experiment == "poisoning":
        options["seeds"] = None if args.seed is None else [args.seed]
    else:
        options["seed"] = 0 if args.seed is None else args.seed
    results = run(out, **options)
    print(f"comparison with the paper (details in {out / 'report.md'}):")
    for finding in results["paper_comparison"]:  # every experiment gives {claim, verdict, ours} entries
        print(f"  {finding['verdict'].upper():9s} {finding['claim']}")
        print(f"            ours: {finding['ours']}")
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and the plots")
    return EXIT_OK


# experiment name -> (its entry point, how the progress line names it)
EXPERIMENTS = {
    "digits": (reproduce_digits, "the paper's digits experiments"),
    "lm": (reproduce_lm, "the paper's language-model findings on a small GPT-NeoX"),
    "poisoning": (reproduce_poisoning, "the paper's poisoning finding on a small CNN"),
}


# ----- estimate ---------------------------------------------------------------------------------
def command_estimate(args) -> int:
    # Everything about the command line itself is checked before the model is loaded.
    if args.resume and args.journal is None:
        raise UsageError("--resume needs --journal FILE (the journal of the run to continue)")
    out = _output_file(args.out)
    if args.journal is not None:
        _check_journal(args.journal, args.resume)
    device = _check_device(args.device)
    if args.distributed and device is not None and str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # one GPU per torchrun process
    model, data, extras = _model_and_data(args)
    options = _estimate_options(args, device, extras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the summary lists direction statuses and notes
        try:
            result = estimate(model, data, **options)
        except (ValueError, TypeError, FileExistsError) as error:
            raise UsageError(f"invalid input: {error}") from None
    result.config["source"] = args.model if args.model is not None else args.factory
    if args.distributed and _rank() != 0:
        return EXIT_OK  # every rank holds the whole result; rank 0 reports and writes it
    print(result.summary())
    return _save_result(result, out, args.journal)


def _check_journal(text: str, resume: bool) -> None:
    """--journal: writable, and (without --resume) not already holding a run, found before the model loads."""
    path = _writable_file(text, "--journal")
    if not resume and path.is_file() and path.stat().st_size > 0:
        raise UsageError(
            f"--journal {text} already holds a run; pass --resume to continue it, or choose another journal file"
        )


def _model_and_data(args) -> tuple:
    """(model, data, extras) from --model/--data or --factory."""
    if args.model is not None:
        return load_hf_inputs(
            args.model,
            args.data,
            max_length=args.max_length,
            attn_implementation=args.attn_implementation,
            loss=args.neighborhood == "loss",
        )
    if args.data is not None:
        raise UsageError("--data goes with --model; a --factory returns its own data")
    return load_factory(args.factory)


def _optimizer(args, extras: dict):
    """The Adam state for --preconditioner adam: --optimizer-state, else the factory's optimizer."""
    optimizer = extras.get("optimizer")
    if args.optimizer_state is not None:
        if args.preconditioner != "adam":
            raise UsageError("--optimizer-state is used by --preconditioner adam; add it or drop --optimizer-state")
        if not Path(args.optimizer_state).is_file():
            raise UsageError(f"--optimizer-state {args.optimizer_state}: no such file")
        try:
            optimizer = torch.load(args.optimizer_state, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(
                f"--optimizer-state {args.optimizer_state}: cannot read it as a torch.save'd optimizer state_dict "
                f"({reason})"
            ) from None
    if args.preconditioner == "adam" and optimizer is None:
        raise UsageError(
            "--preconditioner adam needs the model's Adam state: --optimizer-state FILE "
            "(torch.save(optimizer.state_dict(), FILE)) or a factory returning an optimizer"
        )
    return optimizer


def _estimate_options(args, device, extras: dict) -> dict:
    """``estimate``'s keyword arguments from the command's options."""
    loss_fn = extras.get("loss_fn")
    if loss_fn is None:
        loss_fn = default_loss
    optimizer = _optimizer(args, extras)
    sequential = _sequential_options(args)
    return {
        "method": args.method,
        **sequential,
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
