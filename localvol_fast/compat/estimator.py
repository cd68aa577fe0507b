"""tyche's ``estimator.py``: ``VolumeConfig`` and ``VolumeEstimator`` for Hugging Face causal LMs.

The run is ``localvol_fast.estimate`` on the tokenized data; this module turns tyche's config (its
fields, defaults and data formats) into that call and its result back into tyche's ``VolumeResult``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from localvol_fast.compat.volume import VolumeResult
from localvol_fast.core.checks import check_integer
from localvol_fast.core.radial import log_sphere_area
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.parameters import select_parameters
from localvol_fast.nn.preconditioners import adam_preconditioner, selected_optimizer_state

__all__ = ["CausalLMEstimator", "VolumeConfig", "VolumeEstimator"]

_LOG_2PI = math.log(2.0 * math.pi)
_CAUSAL_DEFAULTS = {"data_batch_size": None, "max_seq_len": 2048, "val_size": 10, "text_key": "text"}
_LOGIT_ELEMENTS_PER_BATCH = 1 << 25  # data_batch_size=None: rows per forward so that rows * T * vocab stays near this
_CHUNK_GROUP = 2048  # chunking packs this many examples at a time and drops each group's last chunk, as tyche does
_PRECONDITIONER_TYPES = (None, "adam", "fisher")


@dataclass
class VolumeConfig:
    """tyche's ``VolumeConfig`` (``src/tyche/estimator.py``): the same fields, in the same order, same defaults.

    Fields used (model_type="causal", the Hugging Face path):
      model: a causal LM (``nn.Module``; its ``forward`` takes ``input_ids`` / ``attention_mask`` and returns
          logits or an object with ``.logits``), on the device the run should use (CPU or CUDA).
      tokenizer: a Hugging Face tokenizer; needed when the dataset holds text. Its ``padding_side`` and
          ``truncation_side`` are respected; no pad token is needed (padding is masked).
      dataset: a ``datasets.Dataset``, a list of dicts ``{text_key: str}``, a dict of columns
          ``{text_key: [str, ...]}`` or a list of strings; or already tokenized examples (dicts with
          ``input_ids`` and optionally ``attention_mask``, a dict/BatchEncoding of (N, T) tensors, or an
          (N, T) integer tensor), which need no tokenizer.
      text_key ("text"), val_size (10 sequences), max_seq_len (2048 tokens, truncation), chunking (False:
          one padded sequence per example; True: tyche's GPT-style packing into full max_seq_len chunks).
      n_samples (100 directions), cutoff (1e-2 nats), seed (42), tqdm (progress), sigma (None: the RMS of
          the parameters), l2_reg (0.0: the cost is KL + l2_reg/2 |theta - theta0|^2, as in tyche),
      model_batch_size (directions searched together), data_batch_size (sequences per forward pass),
      preconditioner_type (None, "adam" or "fisher"), preconditioner_eps, preconditioner_exponent, adam_order.
      debug: print the resolved settings.
    Accepted and ignored: tol, y_tol (tyche's approximate Gaussian integral; ours is exact), cache_mode (the
    anchor's log-probabilities are always cached, on the model's device), implicit_vectors, block_size,
    model_name, checkpoint_step, split (used by tyche's Pythia/ConvNeXt loaders only).
    Not in tyche: ``optimizer`` (a torch Adam/AdamW that trained ``model``, or its ``state_dict()``, for
    preconditioner_type="adam"), ``fisher_passes`` (backward passes of the "fisher" preconditioner) and
    ``rtol`` (search tolerance; tyche's run() uses 1e-2). See ``VolumeEstimator`` for the full mapping.
    """

    # Common parameters
    n_samples: int = 100
    model_batch_size: int | None = None
    sigma: float | None = None
    l2_reg: float = 0.0
    cutoff: float = 1e-2
    tol: float = 1e-2
    y_tol: float = 5
    seed: int = 42
    tqdm: bool = True
    debug: bool = False
    reduction: str | None = "mean"
    # Model-specific parameters
    model_type: str = "causal"
    model_name: str | None = None
    checkpoint_step: int | None = None
    val_size: int | None = None
    split: str | None = None
    # Hugging Face models and data
    model: object = None
    tokenizer: object = None
    dataset: object = None
    text_key: str | None = None
    max_seq_len: int | None = None
    cache_mode: str | None = None
    chunking: bool = False
    data_batch_size: int | None = None
    implicit_vectors: bool = False
    block_size: int = 1024**2
    # Preconditioner
    preconditioner_type: str | None = None
    preconditioner_eps: float = 1e-5
    preconditioner_exponent: float = 0.5
    adam_order: int = 2
    # localvol_fast additions (not in tyche)
    optimizer: object = None
    fisher_passes: int = 16
    rtol: float = 1e-2


def _token_row(ids, mask=None) -> list[int]:
    """The real tokens of one tokenized example (positions whose mask is 1), as a list of ints."""
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() == 0:
        return []
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(-1)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has {mask.numel()} entries but input_ids has {ids.numel()}")
        ids = ids[mask.bool()]
    return [int(t) for t in ids.tolist()]


def _check_model_and_data(cfg: VolumeConfig) -> None:
    if cfg.model is None:
        raise ValueError("VolumeConfig.model is required: the causal language model (an nn.Module)")
    if not isinstance(cfg.model, torch.nn.Module):
        raise TypeError(
            f"VolumeConfig.model must be a loaded model (torch.nn.Module, e.g. AutoModelForCausalLM."
            f"from_pretrained(...)), got {type(cfg.model).__name__}"
        )
    if not any(True for _ in cfg.model.parameters()):
        raise ValueError("VolumeConfig.model has no parameters")
    if cfg.dataset is None:
        raise ValueError("VolumeConfig.dataset is required: the evaluation texts (or tokenized examples)")
    if cfg.reduction != "mean":
        raise NotImplementedError(
            f"reduction={cfg.reduction!r}: only 'mean' (the mean KL over all real tokens) is supported"
        )
    if cfg.cache_mode not in (None, "cpu", "gpu"):
        raise ValueError(f"Invalid cache mode: {cfg.cache_mode!r} (None, 'cpu' or 'gpu')")


def _check_preconditioner(cfg: VolumeConfig) -> None:
    if cfg.preconditioner_type not in _PRECONDITIONER_TYPES:
        raise ValueError(
            f"Invalid preconditioner type: {cfg.preconditioner_type!r}; expected None, 'adam' (needs "
            "VolumeConfig.optimizer) or 'fisher'"
        )
    if cfg.preconditioner_type != "adam":
        if cfg.optimizer is not None:
            raise ValueError("VolumeConfig.optimizer is used by preconditioner_type='adam'; set it or drop optimizer")
        return
    if cfg.optimizer is None:
        raise ValueError(
            "preconditioner_type='adam' needs the optimizer state of the training run: pass "
            "VolumeConfig(optimizer=...) (the torch Adam/AdamW that trained this model, or its state_dict()). "
            "tyche has none for Hugging Face models (it raises NotImplementedError); without one use "
            "preconditioner_type='fisher' (diagonal Fisher at the anchor)"
        )
    if cfg.adam_order not in (1, 2):
        raise ValueError(f"Invalid ADAM order: {cfg.adam_order!r} (1 for exp_avg, 2 for exp_avg_sq)")


def _check_sizes(cfg: VolumeConfig) -> None:
    """The data and batch sizes and l2_reg, normalized in place (ints, a float)."""
    if not isinstance(cfg.text_key, str):
        raise TypeError(f"VolumeConfig.text_key must be a string, got {cfg.text_key!r}")
    cfg.val_size = check_integer(cfg.val_size, "VolumeConfig.val_size")
    cfg.max_seq_len = check_integer(cfg.max_seq_len, "VolumeConfig.max_seq_len")
    for name in ("data_batch_size", "model_batch_size"):  # None: chosen automatically
        if getattr(cfg, name) is not None:
            setattr(cfg, name, check_integer(getattr(cfg, name), f"VolumeConfig.{name}"))
    try:
        l2 = float(cfg.l2_reg)
    except (TypeError, ValueError):
        l2 = math.nan
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"VolumeConfig.l2_reg must be a finite number >= 0, got {cfg.l2_reg!r}")
    cfg.l2_reg = l2


def _first_of_columns(dataset: Mapping, key: str, count: int | None):
    """``_first_examples`` of a dict of columns: texts under ``key``, or (N, T) ``input_ids`` tensors."""
    if key in dataset:  # a dict of columns, e.g. dataset[:n] of a datasets.Dataset
        column = dataset[key]
        if isinstance(column, str):
            raise TypeError(f"dataset[{key!r}] must be a list of texts, got a single string")
        return list(column if count is None else itertools.islice(column, count)), "text"
    if "input_ids" in dataset:  # a BatchEncoding / dict of (N, T) tensors
        ids = torch.as_tensor(dataset["input_ids"])
        if ids.dim() == 1:
            ids = ids.reshape(1, -1)
        mask = dataset.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        rows = [(ids[k], mask[k]) for k in range(ids.shape[0] if count is None else min(count, ids.shape[0]))]
        return rows, "pairs"
    keys = sorted(map(str, dataset))[:10]
    raise ValueError(
        f"text_key {key!r} is not a column of the dataset (keys: {keys}); set VolumeConfig.text_key, or "
        "pick one split of a DatasetDict"
    )


def _token_rows_of_dicts(items: list) -> list[list[int]]:
    """The token rows of tokenized examples (dicts with 'input_ids' and optionally 'attention_mask')."""
    rows = []
    for k, item in enumerate(items):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise ValueError(f"example {k} has no 'input_ids' (the first example is tokenized)")
        rows.append(_token_row(item["input_ids"], item.get("attention_mask")))
    return rows


def _texts_of_dicts(items: list, key: str) -> list:
    """The values under ``key`` of a list of dicts (checked to be strings by the caller)."""
    texts = []
    for k, item in enumerate(items):
        if not isinstance(item, Mapping) or key not in item:
            found = sorted(map(str, item))[:10] if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(
                f"text_key {key!r} is missing from example {k} of the dataset (it has {found}); "
                "set VolumeConfig.text_key to the field holding the text"
            )
        texts.append(item[key])
    return texts


class VolumeEstimator:
    """tyche's ``VolumeEstimator``: ``VolumeEstimator.from_config(VolumeConfig(...)).run()``.

    The run is ``localvol_fast.estimate(model, estimator.data, neighborhood="kl", measure="gaussian", ...)``
    on the tokenized sequences, on the device the model is on (tyche always moves the model to CUDA).

    Field mapping (tyche -> localvol_fast):
      n_samples -> n_samples; cutoff -> cutoff; seed -> seed; tqdm -> progress; rtol (1e-2, tyche's
      value) -> rtol; sigma -> sigma (None: the RMS of the perturbed parameters, as tyche's run() does);
      model_batch_size -> batch_size (directions searched together, several probes per vmapped forward;
      None: chosen automatically. tyche's default of 1 is only a memory setting: the directions and
      results do not depend on it here);
      data_batch_size -> the sequences are split into batches of this many rows (None: as many as keep
      rows * T * vocab near 2^25 logits per forward; the cost, a mean over all real tokens, does not
      depend on it);
      val_size -> the first val_size examples (chunking: the first val_size chunks);
      max_seq_len -> truncation (tokenizer's truncation_side) or the chunk length;
      l2_reg -> the cost becomes mean-token KL(anchor || theta) + l2_reg / 2 * |theta - theta0|^2, which
      is what tyche adds to its KL (it does not derive sigma from l2_reg);
      preconditioner_type: None -> isotropic directions; "adam" -> ``preconditioner="adam"`` with
      ``optimizer=config.optimizer`` (adam_order 2: 1 / (exp_avg_sq^exponent + eps); adam_order 1: the
      same with |exp_avg|). tyche has no Adam state for Hugging Face models and raises
      NotImplementedError there; without ``optimizer`` this raises and points to "fisher".
      "fisher" (not in tyche) -> ``preconditioner="fisher"``: 1 / (diag Fisher^exponent + eps) from
      ``fisher_passes`` backward passes, the usable choice when no optimizer state exists.
      preconditioner_eps / preconditioner_exponent -> preconditioner_eps / preconditioner_exponent.
      reduction: only "mean" (per-sequence costs are not supported). model_type: only "causal" (tyche's
      "pythia" / "convnext" paths download checkpoints; build the model and use "causal").

    Differences from tyche (on purpose):
      - The data: padding positions are excluded through the attention mask, which is also passed to the
        model with matching position ids (tyche passes only input_ids and masks tokens equal to
        pad_token_id, which also drops real tokens equal to it, e.g. EOS when pad = EOS, and breaks left
        padding). Examples with no tokens are dropped; the first val_size examples are tokenized
        (tyche tokenizes the whole dataset, padded to its longest example, then keeps val_size rows).
      - The perturbed parameters are the trainable floating-point ones (tyche: all of them).
      - The directions come from localvol_fast's counter-based stream for ``seed`` (not
        ``torch.manual_seed(seed); torch.randn``), so they differ from tyche's; the radius search and the
        Gaussian integral are localvol_fast's (see the docstring of localvol_fast.compat).
      - The model's weights and train/eval modes are restored after the run (tyche leaves the last
        probe's weights in the model). The config passed in is not modified: the resolved copy is
        ``estimator.config`` (its ``sigma`` is set to the value used after run(), as tyche sets it).
      - chunking: the texts of each group of 2,048 examples are joined with the EOS token (also first),
        tokenized once and cut into chunks of min(max_seq_len, tokenizer.model_max_length) tokens; the last
        chunk of each group is dropped (tyche's chunk_and_tokenize, which needs ``datasets``; special
        tokens are added once per group rather than per chunk).

    Results: ``run()`` returns the compat ``VolumeResult(estimates, props, mults, deltas, gaussint)``
    (float64 on the model's device; ``mults = radii / props``, and ``gaussint`` is defined so that
    ``estimates = gaussint + log V_D + log D - (D/2) log(2 pi sigma^2) - D log props`` holds, as in tyche).
    ``run(native=True)`` returns the ``localvol_fast.VolumeResult`` instead (summary(), bootstrap interval,
    info); after any run the native one is also ``estimator.native_result``.
    Attributes: ``data`` (the list of {"input_ids", "attention_mask"} batches given to ``estimate``),
    ``tokens`` (all rows, one dict of (N, T) tensors), ``notes``.
    """

    def __init__(self, config: VolumeConfig):
        if not isinstance(config, VolumeConfig):
            raise TypeError(f"config must be a VolumeConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config)
        self.notes: list[str] = []
        self.native_result = None
        self._set_defaults()
        self._check_config()
        self.model = self.config.model
        self.tokenizer = self.config.tokenizer
        self.device = next(iter(self.model.parameters())).device
        self.tokens = self._tokenize()
        self.data = self._batches(self.tokens)
        if self.config.debug:
            n, t = self.tokens["input_ids"].shape
            print(
                f"[VolumeEstimator] {n} sequences of {t} tokens ({int(self.tokens['attention_mask'].sum())} real) "
                f"in {len(self.data)} batches on {self.device}; notes: {self.notes}"
            )

    @classmethod
    def from_config(cls, config: VolumeConfig) -> "VolumeEstimator":
        """Build the estimator for ``config`` (tokenizes the data now, so data errors surface here)."""
        model_type = getattr(config, "model_type", "causal")
        if model_type == "causal":
            return CausalLMEstimator(config)
        if model_type in ("pythia", "convnext", "mlp"):
            raise NotImplementedError(
                f"model_type={model_type!r} loads tyche's own checkpoints and data sets, which localvol_fast does "
                "not download; load the model yourself and pass model_type='causal' with model=, tokenizer= and "
                "dataset= (or call localvol_fast.estimate for image models)"
            )
        raise ValueError(f"Invalid model type: {model_type!r} (expected 'causal')")

    # ----- configuration ---------------------------------------------------------------------------
    def _set_defaults(self) -> None:
        for name, value in _CAUSAL_DEFAULTS.items():
            if getattr(self.config, name) is None:
                setattr(self.config, name, value)

    def _check_config(self) -> None:
        # The order is the order a user reads the config in: what is perturbed, on what, then how.
        cfg = self.config
        _check_model_and_data(cfg)
        _check_preconditioner(cfg)
        _check_sizes(cfg)
        if isinstance(cfg.sigma, torch.Tensor):
            cfg.sigma = float(cfg.sigma) if cfg.sigma.numel() == 1 else cfg.sigma.detach()
        ignored = []
        if cfg.implicit_vectors:
            ignored.append("implicit_vectors (directions are materialized per batch of model_batch_size)")
        if cfg.cache_mode is not None:
            ignored.append(
                f"cache_mode={cfg.cache_mode!r} (the anchor's log-probabilities are always cached, on the model's device)"
            )
        if ignored:
            self.notes.append("ignored: " + "; ".join(ignored))

    # ----- data --------------------------------------------------------------------------------------
    def _first_examples(self, count: int | None):
        """The first ``count`` examples of the dataset (all when None), as a list, and their kind.

        The kind says what ``_rows_of`` finds in the list: "text" (strings), "pairs" ((ids, mask)
        tensors) or "items" (a list of strings or dicts, to be looked into).
        """
        dataset = self.config.dataset
        if isinstance(dataset, Mapping):
            return _first_of_columns(dataset, self.config.text_key, count)
        if isinstance(dataset, torch.Tensor):
            ids = dataset.reshape(1, -1) if dataset.dim() == 1 else dataset
            if ids.dim() != 2:
                raise ValueError(f"a tensor dataset must be (N, T) token ids, got shape {tuple(dataset.shape)}")
            n = ids.shape[0] if count is None else min(count, ids.shape[0])
            return [(ids[k], None) for k in range(n)], "pairs"
        if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Iterable):
            raise TypeError(
                "dataset must be a datasets.Dataset, a list of dicts {text_key: text}, a dict of columns, a list "
                f"of strings, or tokenized examples; got {type(dataset).__name__}"
            )
        items = list(dataset if count is None else itertools.islice(iter(dataset), count))
        return items, "items"

    def _rows_of(self, items, kind: str) -> tuple[list[str] | None, list[list[int]] | None]:
        """(texts, None) for text data, (None, token rows) for tokenized data."""
        key = self.config.text_key
        if kind == "pairs":
            return None, [_token_row(ids, mask) for ids, mask in items]
        if kind == "text" or isinstance(items[0], str):
            texts = items
        elif isinstance(items[0], Mapping) and key not in items[0] and "input_ids" in items[0]:
            return None, _token_rows_of_dicts(items)
        elif isinstance(items[0], Mapping):
            texts = _texts_of_dicts(items, key)
        else:
            raise TypeError(
                f"the dataset's examples must be strings or dicts with {key!r}, got {type(items[0]).__name__}"
            )
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"example {k}: the text under {key!r} must be a string, got {type(text).__name__}")
        return texts, None

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "the dataset holds text, so VolumeConfig.tokenizer is required (e.g. AutoTokenizer.from_pretrained"
                "(...)); or pass tokenized examples (dicts with 'input_ids') as the dataset"
            )
        if not callable(self.tokenizer):
            raise TypeError(f"VolumeConfig.tokenizer must be a callable tokenizer, got {type(self.tokenizer).__name__}")
        return self.tokenizer

    def _tokenize(self) -> dict:
        cfg = self.config
        if cfg.chunking:
            rows = self._chunk_rows()
        else:
            items, kind = self._first_examples(cfg.val_size)
            if not items:
                raise ValueError("the dataset is empty: the KL neighborhood needs at least one example")
            texts, rows = self._rows_of(items, kind)
            if texts is not None:
                tokenizer = self._require_tokenizer()
                encoded = tokenizer(texts, truncation=True, max_length=cfg.max_seq_len, padding=False)
                rows = [_token_row(ids) for ids in encoded["input_ids"]]
            side = getattr(self.tokenizer, "truncation_side", "right")
            rows = [r[-cfg.max_seq_len :] if side == "left" else r[: cfg.max_seq_len] for r in rows]
        empty = sum(1 for r in rows if not r)
        rows = [r for r in rows if r]
        if empty:
            self.notes.append(f"{empty} example(s) with no tokens were dropped (they carry no positions)")
        if not rows:
            raise ValueError("every selected example tokenizes to no tokens: there is nothing to evaluate on")
        return self._pad(rows)

    def _chunk_rows(self) -> list[list[int]]:
        """tyche's GPT-style packing: full chunks only, the last one of each group of examples dropped."""
        cfg = self.config
        tokenizer = self._require_tokenizer()
        limit = getattr(tokenizer, "model_max_length", None)
        size = cfg.max_seq_len if not isinstance(limit, int) else max(1, min(cfg.max_seq_len, limit))
        separator = getattr(tokenizer, "eos_token", None) or "<|endoftext|>"
        items, kind = self._first_examples(None)
        if not items:
            raise ValueError("the dataset is empty: the KL neighborhood needs at least one example")
        texts, _ = self._rows_of(items, kind)
        if texts is None:
            raise ValueError("chunking=True packs texts; the dataset holds tokenized examples (use chunking=False)")
        chunks: list[list[int]] = []
        for start in range(0, len(texts), _CHUNK_GROUP):
            joined = separator.join([""] + texts[start : start + _CHUNK_GROUP])
            ids = _token_row(tokenizer(joined, verbose=False)["input_ids"])
            pieces = [ids[k : k + size] for k in range(0, len(ids), size)]
            chunks.extend(pieces[:-1])
            if len(chunks) >= cfg.val_size:
                break
        if not chunks:
            raise ValueError(
                f"Not enough data to create a single complete chunk of {size} tokens: pass more text, a smaller "
                "max_seq_len, or chunking=False"
            )
        return chunks[: cfg.val_size]

    def _pad(self, rows: list[list[int]]) -> dict:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(self.tokenizer, "eos_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for k, r in enumerate(rows):
            span = slice(length - len(r), length) if left else slice(0, len(r))
            ids[k, span] = torch.tensor(r, dtype=torch.long)
            mask[k, span] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _batches(self, tokens: dict) -> list[dict]:
        n, length = tokens["input_ids"].shape
        size = self.config.data_batch_size
        if size is None:
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
            per_row = length * (vocab if isinstance(vocab, int) and vocab > 0 else 1)
            size = max(1, min(n, _LOGIT_ELEMENTS_PER_BATCH // max(per_row, 1)))
            self.config.data_batch_size = size
        return [{k: v[lo : lo + size] for k, v in tokens.items()} for lo in range(0, n, size)]

    # ----- the run -----------------------------------------------------------------------------------
    def _preconditioner_args(self) -> dict:
        cfg = self.config
        kind = cfg.preconditioner_type
        if kind is None:
            return {"preconditioner": None}
        if kind == "fisher":
            return {"preconditioner": "fisher", "fisher_passes": cfg.fisher_passes}
        if cfg.adam_order == 2:
            return {"preconditioner": "adam", "optimizer": cfg.optimizer}
        # adam_order 1: |exp_avg| in place of exp_avg_sq, passed to estimate as a ready (D,) tensor
        named = select_parameters(self.model)
        params = [p for _, p in named]
        source = cfg.optimizer
        if not isinstance(source, torch.optim.Optimizer):
            source = selected_optimizer_state(source, self.model, named)
        p = adam_preconditioner(
            source, params=params, exponent=cfg.preconditioner_exponent, eps=cfg.preconditioner_eps, moment=1
        )
        return {"preconditioner": p.to(self.device)}

    def _estimate(self):
        cfg = self.config
        kwargs = dict(
            cutoff=cfg.cutoff,
            n_samples=cfg.n_samples,
            measure="gaussian",
            sigma=cfg.sigma,
            seed=cfg.seed,
            rtol=cfg.rtol,
            batch_size=cfg.model_batch_size,
            progress=bool(cfg.tqdm),
            preconditioner_exponent=cfg.preconditioner_exponent,
            preconditioner_eps=cfg.preconditioner_eps,
            **self._preconditioner_args(),
        )
        return estimate(self.model, self.data, l2_reg=cfg.l2_reg, **kwargs)

    def run(self, native: bool = False):
        """Estimate; returns tyche's ``VolumeResult`` (or with ``native=True`` the localvol_fast one)."""
        result = self._estimate()
        result.info.setdefault("notes", [])
        result.info["notes"] = self.notes + result.info["notes"]
        result.config.update(
            val_size=int(self.tokens["input_ids"].shape[0]),
            max_seq_len=self.config.max_seq_len,
            chunking=bool(self.config.chunking),
            l2_reg=self.config.l2_reg,
            data_batch_size=self.config.data_batch_size,
            preconditioner_type=self.config.preconditioner_type,
        )
        self.native_result = result
        sigma = result.measure.get("sigma")
        if not isinstance(self.config.sigma, torch.Tensor):
            self.config.sigma = sigma
        if self.config.debug:
            print(f"[VolumeEstimator] sigma = {sigma}\n{result.summary()}")
        return result if native else self.to_tyche(result)

    def to_tyche(self, result) -> VolumeResult:
        """The compat ``VolumeResult`` (tyche's fields) of a native result of this estimator."""
        dim = result.dim
        props = result.props.double()
        sigma = self.config.sigma
        if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
            sum_log_sigma = float(torch.log(sigma.double()).sum())
        else:
            sum_log_sigma = dim * math.log(float(result.measure["sigma"]))
        log_const = log_sphere_area(dim) - 0.5 * dim * _LOG_2PI - sum_log_sigma
        to = lambda t: t.to(self.device)  # noqa: E731
        return VolumeResult(
            estimates=to(result.estimates.double()),
            props=to(props),
            mults=to(result.radii.double() / props),
            deltas=to(result.deltas.double()),
            gaussint=to(result.estimates.double() - log_const + dim * torch.log(props)),
            status=list(result.status),
            n_evals=to(result.n_evals),
        )


class CausalLMEstimator(VolumeEstimator):
    """The estimator ``VolumeEstimator.from_config`` returns for model_type="causal" (as in tyche)."""
