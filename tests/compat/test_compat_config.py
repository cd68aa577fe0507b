"""localvol_fast.compat.VolumeConfig / VolumeEstimator: tyche's estimator front end on a tiny causal LM."""

import dataclasses
import math
import random

import pytest
import torch
from conftest import tiny_gpt_neox

from localvol_fast import estimate, gaussian_directions, log_radial_integral, log_sphere_area
from localvol_fast.compat import CausalLMEstimator, VolumeConfig, VolumeEstimator, VolumeResult
from localvol_fast.nn.preconditioners import adam_preconditioner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a one cat dog bird fish sat ran flew swam on under near mat log tree pond big small red blue old new "
    "and or but is was saw ate slept quickly slowly"
).split()
SPECIAL = ["[PAD]", "[UNK]", "<eos>"]
# A random tiny LM converges at these (see the task notes): every direction reaches the cutoff.
RUN = dict(sigma=0.5, cutoff=1e-3, tqdm=False)


def tiny_tokenizer(padding_side="right"):
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}  # 37 ids < the model's 61
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="<eos>"
    )
    tok.padding_side = padding_side
    return tok


def texts(n=12, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def lm():
    return tiny_gpt_neox(0)


@pytest.fixture(scope="module")
def base(lm):
    """One estimator and its native run, shared by several tests."""
    cfg = VolumeConfig(model=lm, tokenizer=tiny_tokenizer(), dataset=[{"text": t} for t in texts()],
                       n_samples=6, val_size=4, max_seq_len=6, seed=3, **RUN)
    est = VolumeEstimator.from_config(cfg)
    return cfg, est, est.run(native=True)


def test_run_is_estimate_on_the_same_tokens(lm, base):
    cfg, est, native = base
    assert isinstance(est, CausalLMEstimator)
    expected = tiny_tokenizer()(texts()[:4], padding=True, truncation=True, max_length=6, return_tensors="pt")
    assert torch.equal(est.tokens["input_ids"], expected["input_ids"])
    assert torch.equal(est.tokens["attention_mask"], expected["attention_mask"])
    assert len(est.data) == 1  # data_batch_size=None: one batch for this small vocabulary
    direct = estimate(lm, dict(expected), cutoff=1e-3, n_samples=6, sigma=0.5, seed=3, rtol=1e-2, progress=False)
    for name in ("estimates", "radii", "deltas", "props", "n_evals"):
        assert torch.equal(getattr(native, name), getattr(direct, name)), name
    assert native.status == ["converged"] * 6 and math.isfinite(native.log_volume)
    assert est.native_result is native
    # the caller's config is never modified; the estimator's copy holds the resolved values
    assert cfg.data_batch_size is None and cfg.text_key is None
    assert est.config.data_batch_size == 4 and est.config.text_key == "text" and est.config.sigma == 0.5


def test_tyche_result_fields(lm, base):
    _, est, native = base
    res = est.to_tyche(native)
    assert isinstance(res, VolumeResult) and res.estimates.dtype == torch.float64
    assert bool(torch.isfinite(res.estimates).all()) and bool(torch.isfinite(res.gaussint).all())
    assert torch.equal(res.estimates, native.estimates) and torch.equal(res.deltas, native.deltas)
    torch.testing.assert_close(res.mults * res.props, native.radii, rtol=1e-14, atol=0)
    # gaussint from scratch: log integral_0^r t^(D-1) exp(-a t^2/2 + b t + c) dt along w = g / |g|
    theta0 = torch.cat([p.detach().reshape(-1) for p in lm.parameters()]).double()
    dim, sigma = theta0.numel(), 0.5
    g = gaussian_directions(3, torch.arange(6), dim).double()
    w = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    a = torch.full((6,), 1 / sigma**2, dtype=torch.float64)
    b = -(w @ theta0) / sigma**2
    c = -float(theta0 @ theta0) / (2 * sigma**2)
    gaussint = log_radial_integral(float(dim - 1), a, b, native.radii) + c
    torch.testing.assert_close(res.gaussint, gaussint, rtol=0, atol=1e-6 * dim)
    # tyche's identity between the fields
    log_const = log_sphere_area(dim) - 0.5 * dim * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(res.estimates, res.gaussint + log_const - dim * torch.log(res.props), rtol=1e-12, atol=0)


def test_config_fields_are_honoured(lm, base):
    _, est, native = base
    data = [{"text": t} for t in texts()]
    # val_size, max_seq_len, data_batch_size shape the data; model_batch_size does not change results
    other = VolumeEstimator.from_config(
        VolumeConfig(model=lm, tokenizer=tiny_tokenizer(), dataset=data, n_samples=3, val_size=3, max_seq_len=4,
                     data_batch_size=2, model_batch_size=2, seed=3, **RUN)
    )
    assert other.tokens["input_ids"].shape == (3, 4) and [b["input_ids"].shape[0] for b in other.data] == [2, 1]
    # data_batch_size only splits the forward passes: same costs up to rounding, same directions
    split = VolumeEstimator.from_config(
        VolumeConfig(model=lm, tokenizer=tiny_tokenizer(), dataset=data, n_samples=3, val_size=4, max_seq_len=6,
                     data_batch_size=3, model_batch_size=2, seed=3, **RUN)
    ).run()
    assert split.estimates.shape == (3,)
    torch.testing.assert_close(split.radii, native.radii[:3], rtol=1e-3, atol=0)
    # seed selects the directions
    reseeded = VolumeEstimator.from_config(
        VolumeConfig(model=lm, tokenizer=tiny_tokenizer(), dataset=data, n_samples=3, val_size=4, max_seq_len=6,
                     seed=4, **RUN)
    ).run(native=True)
    assert not torch.allclose(reseeded.radii, native.radii[:3])
    # defaults: tyche's val_size 10, max_seq_len 2048, text_key "text"
    default = VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tiny_tokenizer(), dataset=texts(12)))
    assert default.config.val_size == 10 and default.config.max_seq_len == 2048 and default.config.text_key == "text"
    assert default.tokens["input_ids"].shape[0] == 10 and default.config.n_samples == 100


def test_padding_side_and_plain_strings(lm, base):
    _, est, native = base
    left = VolumeEstimator.from_config(
        VolumeConfig(model=lm, tokenizer=tiny_tokenizer("left"), dataset=texts(), n_samples=3, val_size=4,
                     max_seq_len=6, seed=3, **RUN)
    )
    mask = left.tokens["attention_mask"]
    assert bool((mask[:, -1] == 1).all()) and not bool((mask[:, 0] == 1).all())  # padded on the left
    assert torch.equal(mask.sum(1), est.tokens["attention_mask"].sum(1))
    torch.testing.assert_close(left.run(native=True).radii, native.radii[:3], rtol=1e-3, atol=0)


def test_chunking_packs_full_chunks(lm):
    tok = tiny_tokenizer()
    est = VolumeEstimator.from_config(
        VolumeConfig(model=lm, tokenizer=tok, dataset={"text": texts(12)}, chunking=True, max_seq_len=8, val_size=3)
    )
    ids = est.tokens["input_ids"]
    assert ids.shape == (3, 8) and bool(est.tokens["attention_mask"].all())
    assert int(ids[0, 0]) == tok.eos_token_id  # the packed stream starts with the separator
    with pytest.raises(ValueError, match="single complete chunk"):
        VolumeEstimator.from_config(
            VolumeConfig(model=lm, tokenizer=tok, dataset=["a cat"], chunking=True, max_seq_len=64)
        )


def test_preconditioner_type_mapping(lm):
    tok, data = tiny_tokenizer(), [{"text": t} for t in texts(4)]
    common = dict(model=lm, tokenizer=tok, dataset=data, n_samples=2, val_size=4, max_seq_len=6, seed=1, **RUN)
    # "fisher" (no optimizer state needed). A larger eps than the paper's 1e-5 keeps the directions out of the
    # embedding rows of tokens the data never uses (zero Fisher), along which the KL never reaches the cutoff.
    est = VolumeEstimator.from_config(
        VolumeConfig(preconditioner_type="fisher", fisher_passes=2, preconditioner_eps=1e-2, **common)
    )
    fisher = est.run(native=True)
    direct = estimate(lm, est.data, preconditioner="fisher", fisher_passes=2, preconditioner_eps=1e-2, cutoff=1e-3,
                      n_samples=2, sigma=0.5, seed=1, progress=False)
    assert fisher.info["preconditioner"]["name"] == "fisher" and fisher.info["preconditioner"]["eps"] == 1e-2
    assert torch.equal(fisher.estimates, direct.estimates) and fisher.status == ["converged"] * 2

    # "adam": the moments of an optimizer that has stepped on this model (adam_order picks the moment)
    model = tiny_gpt_neox(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(input_ids=tok(texts(2), padding=True, return_tensors="pt")["input_ids"]).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()
    adam = VolumeEstimator.from_config(
        VolumeConfig(**{**common, "model": model}, preconditioner_type="adam", optimizer=opt)
    )
    assert adam._preconditioner_args() == {"preconditioner": "adam", "optimizer": opt}
    first = VolumeEstimator.from_config(
        VolumeConfig(**{**common, "model": model}, preconditioner_type="adam", optimizer=opt.state_dict(), adam_order=1)
    )
    p = first._preconditioner_args()["preconditioner"]
    expected = adam_preconditioner(opt, params=list(model.parameters()), moment=1)
    torch.testing.assert_close(p, expected, rtol=0, atol=0)
    assert torch.isfinite(first.run().estimates).all()

    with pytest.raises(ValueError, match="fisher"):  # no optimizer state: tyche raises too; we point to fisher
        VolumeEstimator.from_config(VolumeConfig(preconditioner_type="adam", **common))
    with pytest.raises(ValueError, match="Invalid preconditioner type"):
        VolumeEstimator.from_config(VolumeConfig(preconditioner_type="diag", **common))
    with pytest.raises(ValueError, match="Invalid ADAM order"):
        VolumeEstimator.from_config(VolumeConfig(preconditioner_type="adam", optimizer=opt, adam_order=3, **common))


def test_l2_reg_adds_the_penalty(lm, base):
    _, est, native = base
    cfg = dataclasses.replace(est.config, l2_reg=50.0, sigma=0.5, n_samples=3)
    penalized = VolumeEstimator.from_config(cfg).run(native=True)
    assert penalized.config["neighborhood"] == "kl+l2" and penalized.status == ["converged"] * 3
    assert bool((penalized.radii < 0.9 * native.radii[:3]).all())  # a positive term reaches the cutoff sooner
    # deltas is the penalized cost (KL + l2_reg/2 |step|^2) at the accepted probe: within rtol of the cutoff
    assert bool((penalized.deltas - 1e-3).abs().le(1e-5 * (1 + 1e-9)).all())


def test_clear_errors(lm):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="tokenizer is required"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, dataset=texts(3)))
    with pytest.raises(ValueError, match="empty"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tok, dataset=[]))
    with pytest.raises(ValueError, match="text_key 'text' is missing"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tok, dataset=[{"content": "a cat"}]))
    with pytest.raises(ValueError, match="not a column"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tok, dataset={"content": ["a cat"]}))
    with pytest.raises(ValueError, match="model is required"):
        VolumeEstimator.from_config(VolumeConfig(tokenizer=tok, dataset=texts(3)))
    with pytest.raises(TypeError, match="loaded model"):
        VolumeEstimator.from_config(VolumeConfig(model="EleutherAI/pythia-31m", tokenizer=tok, dataset=texts(3)))
    with pytest.raises(ValueError, match="no tokens"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tok, dataset=["", ""]))
    with pytest.raises(NotImplementedError, match="causal"):
        VolumeEstimator.from_config(VolumeConfig(model_type="pythia"))
    with pytest.raises(NotImplementedError, match="mean"):
        VolumeEstimator.from_config(VolumeConfig(model=lm, tokenizer=tok, dataset=texts(3), reduction=None))
    # tokenized examples need no tokenizer
    est = VolumeEstimator.from_config(VolumeConfig(model=lm, dataset=[{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]))
    assert est.tokens["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert est.tokens["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_models_cuda_device(base):
    _, est, native = base
    model = tiny_gpt_neox(0).to("cuda")
    cfg = dataclasses.replace(est.config, model=model, sigma=0.5)
    gpu = VolumeEstimator.from_config(cfg)
    assert gpu.tokens["input_ids"].device.type == "cuda"
    res = gpu.run()
    assert res.estimates.device.type == "cuda" and bool(torch.isfinite(res.estimates).all())
    assert next(model.parameters()).device.type == "cuda"  # the model stays where it was
    torch.testing.assert_close(res.mults.cpu() * res.props.cpu(), native.radii, rtol=1e-2, atol=0)
