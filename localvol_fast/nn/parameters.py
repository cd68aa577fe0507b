"""Which parameters of a model are perturbed, and their one flat layout (the anchor theta0).

The layout is the contract of every kernel (``ops/SPEC.md``): the perturbed parameters in
``named_parameters()`` order, each flattened row-major and concatenated; a parameter's ``start`` is the
number of elements before it. ``ParameterLayout`` is the only place that computes those offsets.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def select_parameters(model: torch.nn.Module, params=None) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs to perturb: trainable floating-point ones, optionally restricted.

    params: None (all), a list of names, or a predicate ``params(name, parameter) -> bool``.
    Integer/complex parameters and frozen ones (requires_grad=False) are never perturbed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if params is not None:
        if callable(params):
            named = [(n, p) for n, p in named if params(n, p)]
        else:
            wanted = [params] if isinstance(params, str) else list(params)
            available = dict(named)
            missing = [n for n in wanted if n not in available]
            if missing:
                raise ValueError(
                    f"params names {missing} are not trainable floating-point parameters of the model; "
                    f"available: {list(available)[:10]}{' ...' if len(available) > 10 else ''}"
                )
            named = [(n, available[n]) for n in dict.fromkeys(wanted)]
    if not named:
        raise ValueError(
            "the model has no trainable floating-point parameters to perturb"
            + (" among the selected params" if params is not None else "")
        )
    check_perturbable(named)
    return named


def has_overlapping_memory(p: torch.Tensor) -> bool:
    """Whether some elements of ``p`` share one memory location (an expanded view: a stride of 0)."""
    return any(stride == 0 and size > 1 for size, stride in zip(p.shape, p.stride()))


def check_perturbable(named) -> None:
    """Refuse, before the model is touched, parameters whose elements cannot be perturbed one by one:
    an expanded parameter (stride 0) has fewer values in memory than elements, so no probe can give
    its elements different values (and writing the anchor back into it fails)."""
    for name, p in named:
        if has_overlapping_memory(p):
            raise ValueError(
                f"parameter {name!r} is an expanded view (shape {tuple(p.shape)}, strides {tuple(p.stride())}): "
                "several of its elements share one memory location, so they cannot be perturbed one by one; "
                "give it memory of its own (p.data = p.data.clone()) or leave it out with params="
            )


def skipped_parameter_note(model: torch.nn.Module) -> str | None:
    """A note naming the trainable parameters that are not floating point (never perturbed), if any."""
    skipped = [f"{n} ({p.dtype})" for n, p in model.named_parameters() if not p.is_floating_point()]
    if not skipped:
        return None
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"parameters that are not floating point are not perturbed: {', '.join(skipped[:5])}{more}"


def check_one_device(named) -> None:
    """The perturbed parameters must share one device (move the model with ``device=``)."""
    devices = {}
    for name, p in named:
        devices.setdefault(str(p.device), name)
    if len(devices) > 1:
        listing = ", ".join(f"{n!r} on {d}" for d, n in devices.items())
        raise ValueError(
            f"the perturbed parameters are on several devices ({listing}); pass device= to run the whole model on "
            "one device, or restrict params= to the parameters of one device"
        )


class ParameterLayout:
    """The perturbed parameters and where each sits in the flat vector theta (D,).

    names, params, shapes, dtypes, numels, starts: per parameter, in layout order; dim = D.
    """

    def __init__(self, named_params):
        named = list(named_params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.dtypes = [p.dtype for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.starts, offset = [], 0
        for n in self.numels:
            self.starts.append(offset)
            offset += n
        self.dim = offset
        self._start_of = {id(p): s for p, s in zip(self.params, self.starts)}

    def __len__(self) -> int:
        return len(self.params)

    def spans(self) -> Iterator[tuple[torch.nn.Parameter, int, int]]:
        """(parameter, start, stop) of each perturbed parameter."""
        for p, start, n in zip(self.params, self.starts, self.numels):
            yield p, start, start + n

    def start_of(self, param) -> int | None:
        """Where ``param`` (by identity) starts in theta; None if it is not perturbed."""
        return self._start_of.get(id(param))

    def flatten(self) -> torch.Tensor:
        """theta0: one copy of the perturbed parameters, in their (promoted) dtype."""
        dtype = self.dtypes[0]
        for d in self.dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        return torch.cat([p.detach().reshape(-1).to(dtype) for p in self.params])

    @torch.no_grad()
    def write(self, theta: torch.Tensor) -> None:
        """Write the flat ``theta`` into the parameters (exact when theta is their own copy)."""
        for p, start, stop in self.spans():
            p.copy_(theta[start:stop].view_as(p))

    def split(self, theta: torch.Tensor) -> dict:
        """(..., D) vectors as {name: (..., *shape)} views in each parameter's dtype."""
        lead = tuple(theta.shape[:-1])
        return {  # a tuple shape: reshape(*(), *()) of a 0-d parameter of one probe would get no shape
            name: theta[..., start:stop].reshape(lead + tuple(shape)).to(dtype)
            for name, shape, dtype, (_, start, stop) in zip(self.names, self.shapes, self.dtypes, self.spans())
        }
