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


# --------------------------------------------------------------------------------------------------
# The exact-restoration check: everything ``nn.preservation`` promises to give back
# --------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality is bit-exact and NaN payloads count."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _slots(model: torch.nn.Module) -> list:
    """Every module's parameter and buffer entries, by object identity (a shared module under each of its
    names, so tied weights must be the same object everywhere)."""
    return [
        (name, kind, key, id(t))
        for name, m in model.named_modules(remove_duplicate=False)
        for kind, entries in (("param", m._parameters), ("buffer", m._buffers))
        for key, t in entries.items()
    ]


def _memory(t: torch.Tensor) -> tuple:
    return (tuple(t.stride()), t.storage_offset(), None if t.is_meta else t.data_ptr())


def snapshot(model: torch.nn.Module) -> dict:
    state = model.state_dict(keep_vars=True)
    return {
        "state": {k: (v.dtype, v.shape, v.device, None if v.is_meta else _bits(v).clone()) for k, v in state.items()},
        "modes": [m.training for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "grad_values": [None if p.grad is None else (id(p.grad), _bits(p.grad).clone()) for p in model.parameters()],
        "slots": _slots(model),
        "memory": {k: _memory(v) for k, v in state.items()},
        "types": {k: type(v) for k, v in state.items()},
    }


def assert_restored(model: torch.nn.Module, snap: dict) -> None:
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(snap["state"]), "the state_dict keys changed"
    for k, v in state.items():
        dtype, shape, device, bits = snap["state"][k]
        assert (v.dtype, v.shape, v.device) == (dtype, shape, device), k
        if bits is not None:
            assert torch.equal(_bits(v), bits), f"{k} was not restored bit for bit"
    assert [m.training for m in model.modules()] == snap["modes"], "train/eval modes changed"
    assert [id(p) for p in model.parameters()] == snap["ids"], "parameters were replaced"
    assert [p.requires_grad for p in model.parameters()] == snap["requires_grad"]
    assert [p.grad is None for p in model.parameters()] == snap["grads"]
    assert _slots(model) == snap["slots"], "a module's parameter or buffer entries are other objects"
    assert {k: type(v) for k, v in state.items()} == snap["types"], "a Parameter came back as another type"
    assert {k: _memory(v) for k, v in state.items()} == snap["memory"], "a tensor's memory or strides changed"
    for p, saved in zip(model.parameters(), snap["grad_values"]):
        if saved is not None:
            assert id(p.grad) == saved[0] and torch.equal(_bits(p.grad), saved[1]), "a .grad was not restored"


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
