"""Shared fixtures: small models trained or built in-process (no downloads)."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before triton is first imported (by any test module or by torch._dynamo), so it is set here.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def digits_clean():
    from localvol_fast.apps.digits import train_digits

    return train_digits(300, seed=0)


@pytest.fixture(scope="session")
def digits_poisoned():
    from localvol_fast.apps.digits import train_digits

    return train_digits(300, seed=0, poison_fraction=0.4)


class Wrapped(torch.nn.Module):
    """A plain MLP behind a wrapper, so that it takes the generic paths, not the factored plain-MLP one."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def tiny_gpt_neox(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batch(seed: int = 0, rows: int = 3, length: int = 10, vocab: int = 61):
    """input_ids with right padding of different lengths, and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(1, rows):
        mask[r, length - 2 * r :] = 0
    return ids, mask
