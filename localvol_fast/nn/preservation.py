"""Giving the user's model back exactly: weights, buffers, train/eval modes and devices."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module, device=None, restored_elsewhere=()):
    """Run in eval mode (on ``device``), then restore weights, buffers, modes and devices exactly.

    ``restored_elsewhere``: names of parameters the caller restores itself (from its anchor copy), so
    that no second full copy of a large model is kept here. Restoring never hides the exception that
    ended the run.
    """
    modes = [(m, m.training) for m in model.modules()]
    skip = set(restored_elsewhere)
    state = model.state_dict(keep_vars=True)
    saved = {k: v.detach().clone() for k, v in state.items() if k not in skip and v.device.type != "meta"}
    homes = {k: v.device for k, v in state.items()}
    moved = device is not None and any(v.device != torch.device(device) for v in state.values())
    try:
        if moved:
            model.to(device)
        model.eval()
        yield model
    finally:
        try:
            with torch.no_grad():
                for name, value in model.state_dict(keep_vars=True).items():
                    if moved and value.device != homes[name]:  # each tensor back to its own device
                        value.data = value.data.to(homes[name])
                    if name in saved and not torch.equal(value.detach(), saved[name].to(value.device)):
                        value.detach().copy_(saved[name].to(value.device))
        finally:
            for module, training in modes:
                module.training = training
