"""Peak resident memory of one estimate() on a ~100 M-parameter GPT-NeoX (random weights), in its own process.

    python tests/nn/memory_worker.py N_SAMPLES  ->  prints a JSON line {"n_samples", "peak_rss_mib", ...}
"""

import json
import resource
import sys
import time
import warnings

import torch


def build():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=128, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


def main():
    import localvol_fast as lv

    n_samples = int(sys.argv[1])
    torch.set_num_threads(2)
    model = build()
    ids = torch.randint(0, 8192, (1, 8), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lv.estimate(model, data, n_samples=n_samples, sigma=0.02, cutoff=1e-2, progress=False, batch_size=4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "n_samples": n_samples, "parameters": result.dim, "peak_rss_mib": peak, "rss_after_model_mib": before,
        "seconds": time.perf_counter() - start, "evaluation": result.info["evaluation"],
        "status": result.status_counts(), "evals_per_direction": result.evals_per_direction,
    }))


if __name__ == "__main__":
    main()
