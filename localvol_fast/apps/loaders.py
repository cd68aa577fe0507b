"""What ``localvol estimate`` reads: a model and its data from a factory or a Hugging Face folder.

Every bad input (a path, a factory, a file's contents) raises ``UsageError``, which the command line
reports as exit code 2 without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from localvol_fast.nn.neighborhoods import output_logits

FACTORY_EXTRAS = ("optimizer", "loss_fn")


class UsageError(Exception):
    """Bad command-line input (paths, factories, option values): exit code 2."""


def load_factory(spec: str):
    """Import ``module:function`` and call it; returns (model, data, extras dict)."""
    model, data, extras = _split_factory_output(spec, _factory_function(spec)())
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--factory {spec} returned a {type(model).__name__} as the model; expected a torch.nn.Module")
    unknown = sorted(set(extras) - set(FACTORY_EXTRAS))
    if unknown:
        raise UsageError(f"--factory {spec}: unknown extras {unknown}; allowed: {', '.join(FACTORY_EXTRAS)}")
    return model, data, extras


def _factory_function(spec: str):
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
    return function


def _split_factory_output(spec: str, built) -> tuple:
    """(model, data, extras) from what a factory returned: a pair, a triple or a dict."""
    if isinstance(built, dict):
        built = dict(built)
        missing = [k for k in ("model", "data") if k not in built]
        if missing:
            raise UsageError(f"--factory {spec} returned a dict without {missing}")
        return built.pop("model"), built.pop("data"), built
    if isinstance(built, (tuple, list)) and len(built) in (2, 3):
        return built[0], built[1], dict(built[2]) if len(built) == 3 else {}
    raise UsageError(
        f"--factory {spec} must return (model, data), (model, data, extras) or a dict; got {type(built).__name__}"
    )


def load_hf_inputs(model_dir: str, data_path: str | None, *, max_length: int, attn_implementation, loss: bool):
    """(model, data, extras) for ``--model DIR --data FILE``; ``loss``: set up the loss neighborhood
    (labels from the token ids, the causal LM loss)."""
    if data_path is None:
        raise UsageError("--model needs --data (a text file or a .pt tensor of token ids)")
    model = load_hf_model(model_dir, attn_implementation)
    data = load_token_data(data_path, model_dir, max_length)
    # Token ids outside the vocabulary are refused by ``estimate`` itself (before any forward pass).
    extras = {}
    if loss:
        data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
        extras["loss_fn"] = causal_lm_loss
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
    except Exception as error:  # noqa: BLE001 - any failure to read the user's folder is bad input
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"--model {directory}: cannot load a causal language model from it ({reason})") from None
    return model.eval()


def _ids_from_object(obj, source: str, max_length: int) -> dict:
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
    mask = _mask_for(mask, ids, source)
    return {"input_ids": ids[:, :max_length].long(), "attention_mask": mask[:, :max_length].long()}


def _mask_for(mask, ids: torch.Tensor, source: str) -> torch.Tensor:
    """The attention mask of (N, T) ids: all ones if none was saved, else one of the same shape."""
    if mask is None:
        return torch.ones_like(ids)
    if isinstance(mask, torch.Tensor) and mask.dim() == 1:
        mask = mask.unsqueeze(0)  # (T,) like (T,) ids
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UsageError(
            f"--data {source}: attention_mask has shape {shape} but input_ids has shape {tuple(ids.shape)}; save "
            "the mask that belongs to these ids (or none)"
        )
    return mask


def load_token_data(data_path: str, model_dir: str, max_length: int) -> dict:
    """input_ids and attention_mask from a .pt file or a text file (one example per line)."""
    path = Path(data_path)
    if path.is_dir():
        raise UsageError(f"--data {data_path}: is a folder; give a text file or a .pt file of token ids")
    if not path.is_file():
        raise UsageError(f"--data {data_path}: no such file")
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"--data {data_path}: cannot read it as a torch.save'd tensor or dict ({reason})") from None
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
    except Exception as error:  # noqa: BLE001 - any failure to read the user's tokenizer is bad input
        raise UsageError(
            f"--data {data_path} is text, but {model_dir} has no usable tokenizer ({error}); save one with "
            "tokenizer.save_pretrained(DIR) or pass a .pt tensor of token ids"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in {model_dir} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the cost anyway
    encoded = tokenizer(lines, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if encoded["input_ids"].numel() == 0 or not bool(encoded["attention_mask"].any()):
        raise UsageError(
            f"--data {data_path}: the tokenizer in {model_dir} turned its lines into no tokens (it has no usable "
            "vocabulary); save the model's tokenizer there with tokenizer.save_pretrained(DIR) or pass a .pt tensor "
            "of token ids"
        )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def causal_lm_loss(outputs, labels):
    """Mean next-token cross-entropy over unmasked positions (labels -100 are ignored)."""
    logits = output_logits(outputs)[..., :-1, :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels[..., 1:].reshape(-1), ignore_index=-100
    )


def default_loss(outputs, targets):
    """Cross-entropy of the model's logits against the targets: the loss neighborhood's default."""
    return torch.nn.functional.cross_entropy(output_logits(outputs), targets)
