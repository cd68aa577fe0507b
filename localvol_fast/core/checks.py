"""Every argument check of the package, once: each names the bad value and says what to do.

The public entry points (``estimate``, ``estimate_volume``, the compat functions, the CLI) call these
where an option enters; everything below them takes the checked values as given.
"""

from __future__ import annotations

import math
import numbers
import operator
import os

import numpy as np
import torch

SEED_LIMIT = 2**64
_CHECK_CHUNK = 1 << 22  # large vectors are checked in pieces: no full-size temporary

# n_samples: a run keeps per direction and cutoff float64/int64 records (index, radius, cost, slope,
# evaluations, 5 statistics), its status and the Python bookkeeping of the directions still to do:
# at least this many bytes. A count whose records cannot fit in the machine's memory is refused at
# entry, before any work, instead of ending in a MemoryError after the model has run; 2**31 directions
# (over 500 GB of records) is refused on any machine.
MAX_SAMPLES = 2**31
BYTES_PER_DIRECTION = 256


def _type_name(value) -> str:
    return type(value).__name__


def _real_or_none(value) -> float | None:
    """float(value) for a real number: int, float, numpy number or 0-d real tensor; None for anything
    else (bools, strings, complex numbers, tensors with more than one element)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return float(value) if isinstance(value, numbers.Real) else None


def check_number(
    value, name: str, *, minimum: float | None = None, maximum: float | None = None, inclusive: bool = True,
    what: str = "", hint: str = "",
) -> float:
    """A finite real number in a range (``minimum`` <= or <, with ``inclusive``; ``maximum`` always <=).

    what: what the number means, shown in parentheses; hint: what to do instead, appended.
    """
    number = _real_or_none(value)
    about = f" ({what})" if what else ""
    advice = f"; {hint}" if hint else ""
    if number is None:
        raise TypeError(f"{name} must be a number{about}, got {value!r} ({_type_name(value)}){advice}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{about}, got {value!r}{advice}")
    too_small = minimum is not None and (number < minimum if inclusive else number <= minimum)
    too_large = maximum is not None and number > maximum
    if too_small or too_large:
        low = "" if minimum is None else f"{'>=' if inclusive else '>'} {minimum:g}"
        high = "" if maximum is None else f"<= {maximum:g}"
        raise ValueError(f"{name} must be {' and '.join(p for p in (low, high) if p)}{about}, got {value!r}{advice}")
    return number


def check_integer(value, name: str, *, minimum: int = 1, maximum: int | None = None, what: str = "") -> int:
    """An integer >= ``minimum`` (ints, numpy ints and 0-d integer tensors; never bools or floats)."""
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    about = f" ({what})" if what else ""
    if number is None or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        shown = f"{value!r}" if number is not None or isinstance(value, int) else f"{value!r} ({_type_name(value)})"
        raise ValueError(f"{name} must be {kind}{about}, got {shown}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be at most {maximum}{about}, got {value!r}")
    return number


def _physical_memory_bytes() -> int | None:
    """The machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_sample_count(n_samples, n_cutoffs: int = 1) -> int:
    """n_samples: a positive integer whose per-direction records (for ``n_cutoffs`` cutoffs) fit in memory."""
    count = check_integer(n_samples, "n_samples", what="number of directions")
    needed = count * n_cutoffs * BYTES_PER_DIRECTION
    memory = _physical_memory_bytes()
    if count >= MAX_SAMPLES or (memory is not None and needed > memory):
        have = f"this machine has {memory / 2**30:.3g} GiB" if memory is not None else "no machine holds that"
        raise ValueError(
            f"n_samples={count} is more directions than a run can hold: their records alone take at least "
            f"{needed / 2**30:.3g} GiB and {have}; use fewer directions (the estimate's interval narrows like "
            "1/sqrt(n_samples), so 10**3 to 10**5 is usually plenty; no machine takes 2**31 or more)"
        )
    return count


def check_seed(seed) -> int:
    """A seed: an integer in [0, 2^64)."""
    try:
        number = None if isinstance(seed, (bool, np.bool_)) else operator.index(seed)
    except TypeError:
        number = None
    if number is None or not 0 <= number < SEED_LIMIT:
        kind = "" if number is not None else f" ({_type_name(seed)})"
        raise ValueError(
            f"seed must be an integer in [0, 2**64), got {seed!r}{kind}; pass an int such as 0 "
            "(floats and strings are refused rather than rounded, so a seed always means one stream)"
        )
    return number


def check_flag(value, name: str) -> bool:
    """An on/off option: a bool (or numpy bool); 0 and 1 are taken too, anything else is refused."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({_type_name(value)})")


def check_open_fraction(value, name: str, what: str = "") -> float:
    """A number in (0, 1)."""
    number = _real_or_none(value)
    if number is None or not 0 < number < 1:
        raise ValueError(f"{name} must be in (0, 1){f' ({what})' if what else ''}, got {value!r}")
    return number


def check_cutoff(cutoff) -> float:
    """One cutoff eps: a finite positive number (a Python, numpy or 0-d tensor number)."""
    value = _real_or_none(cutoff)
    if value is None:
        raise TypeError(f"cutoff must be a positive number, got {cutoff!r} ({_type_name(cutoff)})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cutoff must be finite and positive (eps in nats for the KL neighborhood), got {cutoff!r}")
    return value


def is_cutoff_list(cutoff) -> bool:
    """Whether ``cutoff`` asks for several cutoffs (then a list of results comes back): a list, a tuple,
    or a 1-d tensor or numpy array; a 0-d tensor or numpy scalar is one cutoff."""
    return isinstance(cutoff, (list, tuple)) or (isinstance(cutoff, (torch.Tensor, np.ndarray)) and cutoff.ndim == 1)


def check_cutoffs(cutoff) -> list[float]:
    """One cutoff or a sequence of them (each finite and positive), as a list of floats."""
    values = [check_cutoff(c) for c in cutoff] if is_cutoff_list(cutoff) else [check_cutoff(cutoff)]
    if not values:
        raise ValueError("cutoff is an empty list; pass at least one positive cutoff")
    return values


def check_device(device) -> torch.device | None:
    """Where to run: None (the model's own device) or a torch device that exists on this machine and
    holds data (not "meta")."""
    if device is None:
        return None
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if checked.type == "meta":
        raise ValueError("device 'meta' holds no data, so the model cannot run there; use 'cpu' or 'cuda'")
    if checked.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use 'cpu'")
        if checked.index is not None and checked.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered 0..{torch.cuda.device_count() - 1}"
            )
    elif checked.type != "cpu":
        backend = getattr(torch.backends, checked.type, None) or getattr(torch, checked.type, None)
        available = getattr(backend, "is_available", None)
        if available is not None and not available():
            raise ValueError(f"device {device!r}: {checked.type} is not available on this machine; use 'cpu'")
    return checked


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


def _range_text(limits) -> str:
    return f"[{limits[0]:g}, {limits[1]:g}]"


def check_positive_vector(
    value, dim: int, name: str, *, limits: tuple[float, float] | None = None, why: str = ""
) -> tuple[float | None, torch.Tensor | None]:
    """A positive scalar or one positive value per parameter: (scalar, None) or (None, (D,) float64).

    limits: the usable range (inclusive) beyond which the measure's arithmetic under- or overflows;
    why: the reason, shown with it.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive number or a tensor of them, got {value!r}")
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
        if limits is not None:
            outside = (vector < limits[0]) | (vector > limits[1])
            if bool(outside.any()):
                first = int(outside.nonzero()[0])
                raise ValueError(
                    f"{name} must lie in {_range_text(limits)}{why}; element {first} is {float(vector[first])!r}. "
                    "Rescale it into that range"
                )
        return None, vector
    scalar = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not (math.isfinite(scalar) and scalar > 0):
        raise ValueError(f"{name} must be a finite positive number, got {scalar!r}")
    if limits is not None and not limits[0] <= scalar <= limits[1]:
        raise ValueError(f"{name} must lie in {_range_text(limits)}{why}, got {scalar!r}. Rescale it into that range")
    return scalar, None


def check_diagonal_size(preconditioner, dim: int) -> None:
    """A diagonal preconditioner must be a (D,) torch tensor (its values are checked when it is normalized).

    numpy arrays and lists are refused, not converted: which dtype and device the diagonal gets is
    the caller's choice (``torch.as_tensor(p)``), and ``estimate`` and ``estimate_volume`` agree on it.
    """
    if not isinstance(preconditioner, torch.Tensor):
        raise TypeError(
            f"preconditioner must be a (D,) = ({dim},) torch.Tensor of positive values, got {_type_name(preconditioner)}; "
            "convert it with torch.as_tensor(...)"
        )
    if preconditioner.numel() != dim:
        raise ValueError(
            f"preconditioner has {preconditioner.numel()} values but D = {dim}; pass a (D,) = ({dim},) tensor of "
            "positive values, one per perturbed parameter"
        )


def check_choice(value, choices, name: str) -> str:
    """One of a fixed set of option names."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
