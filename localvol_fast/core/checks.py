"""Every argument check of the package, once: each names the bad value and says what to do.

The public entry points (``estimate``, ``estimate_volume``, the compat functions, the CLI) call these
where an option enters; everything below them takes the checked values as given.
"""

from __future__ import annotations

import math
import operator

import torch

SEED_LIMIT = 2**64
_CHECK_CHUNK = 1 << 22  # large vectors are checked in pieces: no full-size temporary


def check_integer(value, name: str, *, minimum: int = 1, what: str = "") -> int:
    """An integer >= ``minimum`` (ints, numpy ints and 0-d integer tensors; never bools or floats)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}{f' ({what})' if what else ''}, got {value!r}")
    return number


def check_seed(seed) -> int:
    """A seed: an integer in [0, 2^64)."""
    try:
        number = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        number = None
    if number is None or not 0 <= number < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return number


def check_open_fraction(value, name: str, what: str = "") -> float:
    """A number in (0, 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0 < number < 1:
        raise ValueError(f"{name} must be in (0, 1){f' ({what})' if what else ''}, got {value!r}")
    return number


def check_cutoff(cutoff) -> float:
    """One cutoff eps: a finite positive number."""
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise TypeError(f"cutoff must be a positive number, got {cutoff!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cutoff must be finite and positive (eps in nats for the KL neighborhood), got {cutoff!r}")
    return value


def is_cutoff_list(cutoff) -> bool:
    """Whether ``cutoff`` asks for several cutoffs (then a list of results comes back)."""
    return isinstance(cutoff, (list, tuple)) or (isinstance(cutoff, torch.Tensor) and cutoff.dim() == 1)


def check_cutoffs(cutoff) -> list[float]:
    """One cutoff or a sequence of them (each finite and positive), as a list of floats."""
    values = [check_cutoff(c) for c in cutoff] if isinstance(cutoff, (list, tuple, torch.Tensor)) else [check_cutoff(cutoff)]
    if not values:
        raise ValueError("cutoff is an empty list; pass at least one positive cutoff")
    return values


def check_anchor(anchor) -> torch.Tensor:
    """The anchor theta0 as a flat (D,) view: a non-empty, finite floating-point tensor."""
    if not isinstance(anchor, torch.Tensor) or not anchor.is_floating_point():
        raise TypeError(f"anchor must be a floating-point torch.Tensor, got {type(anchor).__name__}")
    flat = anchor.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("anchor is empty: there are no parameters to perturb")
    for lo in range(0, flat.numel(), _CHECK_CHUNK):
        bad = ~torch.isfinite(flat[lo : lo + _CHECK_CHUNK])
        if bool(bad.any()):
            k = lo + int(bad.nonzero()[0])
            raise ValueError(
                f"the anchor holds NaN/inf values (first at index {k}: {float(flat[k])!r}); "
                "the local volume of a non-finite network is undefined"
            )
    return flat


def check_positive_vector(value, dim: int, name: str) -> tuple[float | None, torch.Tensor | None]:
    """A positive scalar or one positive value per parameter: (scalar, None) or (None, (D,) float64)."""
    if not isinstance(value, (torch.Tensor, int, float)):
        try:  # lists and numpy arrays
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a positive number or a tensor of them, got {type(value).__name__}") from None
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        vector = value.detach().reshape(-1).double()
        if vector.numel() != dim:
            raise ValueError(
                f"{name} has {vector.numel()} values but there are {dim} parameters; pass a scalar or one "
                "value per parameter (flattened in parameter order)"
            )
        bad = ~torch.isfinite(vector) | (vector <= 0)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(f"{name} must be finite and positive; element {first} is {float(vector[first])!r}")
        return None, vector
    scalar = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not (math.isfinite(scalar) and scalar > 0):
        raise ValueError(f"{name} must be a finite positive number, got {scalar!r}")
    return scalar, None


def check_diagonal_size(preconditioner, dim: int) -> None:
    """A diagonal preconditioner must be a (D,) tensor (its values are checked when it is normalized)."""
    if not isinstance(preconditioner, torch.Tensor) or preconditioner.numel() != dim:
        size = preconditioner.numel() if isinstance(preconditioner, torch.Tensor) else type(preconditioner).__name__
        raise ValueError(f"preconditioner must be a (D,) = ({dim},) tensor of positive values, got {size}")


def check_choice(value, choices, name: str) -> str:
    """One of a fixed set of option names."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
