"""GPU figures for ``bench/gpu_check.sh``: kernel throughput per backend and seconds per direction.

Every section runs on its own: a failure is recorded in the JSON and the next section runs. Timings use
CUDA events after warm-up (wall clock on the CPU). ``--device cpu --quick`` smoke-tests the script here.

    python bench/gpu_bench.py --out gpu_figures.json [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback
import warnings

import torch

import localvol_fast as lv
from localvol_fast.apps.baseline import baseline_estimate
from localvol_fast.ops import available_backends, get_backend


def _timer(device: torch.device):
    """Seconds taken by fn(), median of ``repeats`` after one warm-up."""

    def measure(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return measure


def kernel_figures(device, quick: bool) -> dict:
    """Seconds and effective bandwidth of each op on each backend that runs on ``device``."""
    measure = _timer(device)
    n = 1 << (16 if quick else 24)
    rows, positions, vocab = (2, 16, 512) if quick else (20, 1024, 50304)
    indices = torch.arange(8, device=device)
    anchor = torch.randn(n, device=device)
    precond = torch.rand(n, device=device) + 0.5
    out = torch.empty(8, n, device=device)
    scales = torch.rand(8, dtype=torch.float64, device=device)
    logits = torch.randn(rows, positions, vocab, device=device, dtype=torch.bfloat16)
    anchor_lp = torch.log_softmax(torch.randn(rows, positions, vocab, device=device), -1)
    figures = {}
    for name in available_backends(device):
        ops = get_backend(name, device)
        entry = {}
        cases = {
            "gaussian_8xN": (lambda ops=ops: ops.gaussian(7, indices, 0, n), 8 * n * 4),
            "direction_stats_8xN": (lambda ops=ops: ops.direction_stats(7, indices, anchor, precond, None, None, 0), 2 * n * 4),
            "perturb_8xN": (lambda ops=ops: ops.perturb_(out, anchor, precond, 7, indices, scales, 0), 8 * n * 4 + 2 * n * 4),
            "kl_rows_x_positions_x_vocab": (
                lambda ops=ops: ops.kl_against_anchor(logits, anchor_lp, None),
                logits.numel() * (logits.element_size() + 4),
            ),
        }
        for case, (fn, nbytes) in cases.items():
            try:
                seconds = measure(fn)
                entry[case] = {"seconds": seconds, "GB_per_s": nbytes / seconds / 1e9}
            except Exception as error:  # noqa: BLE001 - record and go on
                entry[case] = {"error": f"{type(error).__name__}: {error}"[:300]}
        figures[name] = entry
    figures["shapes"] = {"N": n, "kl": [rows, positions, vocab], "kl_logits_dtype": "bfloat16"}
    return figures


def digits_figures(device, quick: bool) -> dict:
    from localvol_fast.apps.digits import PRIOR_SIGMA, train_digits

    run = train_digits(100 if quick else 500, device=device)
    n = 16 if quick else 128
    figures = {}
    for name in available_backends(device):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = lv.estimate(run.model, run.x_test, n_samples=n, sigma=PRIOR_SIGMA, progress=False, backend=name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        figures[name] = {
            "seconds_per_direction": seconds / n,
            "evals_per_direction": r.evals_per_direction,
            "log_volume": r.log_volume,
            "evaluation": r.info.get("evaluation"),
        }
    return figures


def pythia_figures(device, quick: bool) -> dict:
    """A Pythia-31m-shaped GPT-NeoX (random weights) on 20 x 1,024 tokens: seconds per direction."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if quick:
        config = GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64)
        rows, length, n = 2, 32, 8
    else:  # EleutherAI/pythia-31m's shape
        config = GPTNeoXConfig(vocab_size=50304, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                               intermediate_size=1024, max_position_embeddings=2048, rotary_pct=0.25)
        rows, length, n = 20, 1024, 16
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (rows, length), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dim = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        forward = _timer(device)(lambda: model(**data).logits, repeats=3)

    def timed_estimate(n_samples):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = lv.estimate(model, data, n_samples=n_samples, sigma=0.03997834, cutoff=1e-2, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    # The steady state: the directions after the first n (the pilot, the anchor's set-up, first-call
    # costs) cost the difference of a run of n and a run of n + more on the same directions.
    more = 4 if quick else 48

    def steady_state():
        first_seconds, _ = timed_estimate(n)
        seconds, result = timed_estimate(n + more)
        return seconds, result, (seconds - first_seconds) / more

    seconds, r, steady = steady_state()
    figures = {
        # How much a device-resident, sync-free search could save at most: the time outside evaluations.
        "seconds_in_evaluations": r.info["seconds_evaluating"],
        "seconds_outside_evaluations": seconds - r.info["seconds_evaluating"],
        "search_rounds": r.info["search_rounds"],
        "parameters": dim,
        "tokens": rows * length,
        "bare_forward_seconds": forward,
        "directions": n + more,
        "seconds_per_direction": seconds / (n + more),
        f"seconds_per_direction_after_the_first_{n}": steady,
        "evals_per_direction": r.evals_per_direction,
        "status": r.status_counts(),
        "backend": r.config.get("backend"),
        "evaluation": r.info.get("evaluation"),
        "goal_seconds_per_direction": 0.05,
        "peak_gpu_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    # For the planners, not a default: the same runs with TF32 matmuls (10-bit mantissas), and how far
    # that moves the estimates.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _, r_tf32, tf32_steady = steady_state()
    finally:
        torch.set_float32_matmul_precision(precision)
    figures["tf32"] = {
        f"seconds_per_direction_after_the_first_{n}": tf32_steady,
        "evals_per_direction": r_tf32.evals_per_direction,
        "log_volume_minus_float32": r_tf32.log_volume - r.log_volume,
        "max_abs_estimate_difference_nats": float((r_tf32.estimates - r.estimates).abs().max()),
    }
    # The reference algorithm (one direction at a time, doubling and bisection, the anchor's forward pass
    # in every evaluation) on the same model and data: the issue quotes about 1.4 s per direction.
    base = baseline_estimate(model, data, cutoff=1e-2, n_samples=2, sigma=0.03997834, seed=0, rtol=1e-2)
    baseline_seconds = float(base["seconds"].double().mean())
    figures.update(
        baseline_seconds_per_direction=baseline_seconds,
        baseline_evals_per_direction=float(base["evals"].double().mean()),
        speedup_over_baseline=baseline_seconds / steady if steady > 0 else None,
    )
    return figures


def billion_figures(device, quick: bool) -> dict:
    """A ~1 B-parameter GPT-NeoX in bf16 (random weights), evaluated in place: peak GPU memory against
    2.2 x its weights plus the activations of a plain forward pass (the large-models goal)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if quick:
        config = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=64)
        rows, length, n = 2, 16, 2
    else:
        config = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                               intermediate_size=8192, max_position_embeddings=2048, rotary_pct=0.25)
        rows, length, n = 4, 512, 4
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (rows, length), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(**data)
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lv.estimate(model, data, n_samples=n, sigma=0.02, cutoff=1e-2, progress=False, evaluation="inplace")
    seconds = time.perf_counter() - start
    figures = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16",
        "tokens": rows * length,
        "seconds_per_direction": seconds / n,
        "evals_per_direction": r.evals_per_direction,
        "status": r.status_counts(),
        "anchor_cache": r.info.get("anchor_cache"),
        "weights_GiB": weights / 2**30,
    }
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()  # everything allocated, the weights included
        figures.update(
            activations_GiB=activations / 2**30,
            peak_GiB=peak / 2**30,
            peak_over_weights_plus_activations=peak / (weights + activations),
            goal="peak <= 2.2 x weights + activations",
            goal_met=peak <= 2.2 * weights + activations,
        )
    return figures


SECTIONS = {
    "kernels": kernel_figures,
    "digits": digits_figures,
    "pythia31m_shape": pythia_figures,
    "billion_bf16": billion_figures,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_figures.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "backends": available_backends(device),
        },
        "quick": args.quick,
    }
    try:
        import triton

        report["machine"]["triton"] = triton.__version__
    except ImportError:
        report["machine"]["triton"] = None
    for name in args.sections:
        started = time.perf_counter()
        try:
            report[name] = SECTIONS[name](device, args.quick)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["section_seconds"] = time.perf_counter() - started
        print(f"{name}: done in {report[name]['section_seconds']:.1f} s", flush=True)
        with open(args.out, "w") as handle:  # written after every section: a timeout loses nothing done
            json.dump(report, handle, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
