"""The benchmark models, built in-process (no downloads), shared by ``bench_speed.py`` and ``compare.py``.

- ``digits_mlp``: the paper's 64 -> 64 GELU -> 10 MLP (D = 4,810) trained 500 steps on scikit-learn's
  digits; data: the 773 held-out digits; sigma = 1 / sqrt(lambda N) matching its L2 penalty.
- ``tiny_lm``: a GPT-NeoX causal LM with random weights (about 2.1 M parameters: vocabulary 2,048,
  hidden 192, 3 layers, eager attention); data: 8 x 256 random token ids, attention mask of ones;
  sigma = 0.02, the config's initializer_range (the scale its weights were drawn at).
- ``large_mlp``: 256 -> 512 -> 512 -> 10 GELU (D = 399,370) trained 150 full-batch Adam steps with the
  digits' L2 penalty on the digits upsampled to 16 x 16; data: the 773 held-out digits, upsampled;
  sigma as for the digits MLP (same penalty, same N).

All at cutoff eps = 1e-2 nats, where every direction of these models converges (checked by
``compare.py``, which reports the status counts).

``bench/`` is not a package: the suites and ``compare.py`` import this file by its path.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

CUTOFF = 1e-2
RTOL = 1e-2

LM_VOCAB = 2048
LM_HIDDEN = 192
LM_LAYERS = 3
LM_HEADS = 4
LM_INTERMEDIATE = 768
LM_ROWS = 8
LM_LENGTH = 256
LM_INIT_SCALE = 0.02  # GPTNeoXConfig's initializer_range: the std its weights are drawn with


@dataclass
class BenchModel:
    """A model, its evaluation data (any form ``localvol_fast.estimate`` accepts) and its prior scale."""

    name: str
    model: torch.nn.Module
    data: object
    sigma: float
    description: str
    cutoff: float = CUTOFF
    notes: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad and p.is_floating_point())

    def forward(self):
        """One plain forward pass of the model on all its evaluation data (no grad)."""
        with torch.no_grad():
            if isinstance(self.data, dict):
                return self.model(**self.data)
            return self.model(self.data)


def bare_forward_seconds(bench_model: BenchModel, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time (s) of one plain forward pass of the model on its evaluation data."""
    for _ in range(warmup):
        bench_model.forward()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        bench_model.forward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@functools.cache
def digits_mlp() -> BenchModel:
    from localvol_fast.apps.digits import PRIOR_SIGMA, train_digits

    run = train_digits(500)
    return BenchModel(
        "digits_mlp",
        run.model,
        run.x_test,
        PRIOR_SIGMA,
        "64-64-10 GELU MLP, digits (500 Adam steps), 773 held-out inputs",
        notes={"test_accuracy": run.accuracy()},
    )


@functools.cache
def tiny_lm() -> BenchModel:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=LM_VOCAB,
        hidden_size=LM_HIDDEN,
        num_hidden_layers=LM_LAYERS,
        num_attention_heads=LM_HEADS,
        intermediate_size=LM_INTERMEDIATE,
        max_position_embeddings=LM_LENGTH,
        initializer_range=LM_INIT_SCALE,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, LM_VOCAB, (LM_ROWS, LM_LENGTH), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return BenchModel(
        "tiny_lm",
        model,
        data,
        LM_INIT_SCALE,
        f"GPT-NeoX, random weights, vocab {LM_VOCAB}, hidden {LM_HIDDEN}, {LM_LAYERS} layers, "
        f"{LM_ROWS} x {LM_LENGTH} random tokens",
    )


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """8 x 8 digits (N, 64) -> 16 x 16 (N, 256), bilinear."""
    images = x.reshape(-1, 1, 8, 8)
    return torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).reshape(-1, 256)


@functools.cache
def large_mlp(steps: int = 150) -> BenchModel:
    from localvol_fast.apps.digits import PRIOR_SIGMA, load_digits_split, train_full_batch

    x_train, y_train, x_test, y_test = load_digits_split(0)
    x_train, x_test = _upsample(x_train), _upsample(x_test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)
    )
    train_full_batch(model, torch.optim.Adam(model.parameters(), lr=1e-3), x_train, y_train, steps)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    return BenchModel(
        "large_mlp",
        model,
        x_test,
        PRIOR_SIGMA,
        f"256-512-512-10 GELU MLP, digits upsampled to 16x16 ({steps} Adam steps), 773 held-out inputs",
        notes={"test_accuracy": accuracy},
    )


BUILDERS = {"digits_mlp": digits_mlp, "tiny_lm": tiny_lm, "large_mlp": large_mlp}


def build(name: str) -> BenchModel:
    if name not in BUILDERS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[name]()
