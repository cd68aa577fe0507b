"""The anchor's outputs on each evaluation batch, computed once and kept where ``anchor_cache`` says.

The KL neighborhood compares every probe's outputs with the anchor's log-probabilities. They are kept
on the device, on the CPU, or not at all (recomputed from the anchor's weights per evaluation);
"auto" keeps them on the device while they fit in the memory budget, the rest on the CPU.
"""

from __future__ import annotations

import torch

ANCHOR_CACHE_MODES = ("auto", "device", "cpu", "recompute")


def cache_budget(memory_budget, device) -> float:
    """Bytes the anchor's outputs may take on the device (checked by ``estimate``): a quarter of free GPU
    memory by default."""
    if memory_budget is not None:
        return float(memory_budget)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 4
    return float("inf")


class AnchorCache:
    """Per data batch, what the neighborhood prepared from the anchor's outputs (``neighborhood.prepare``).

    anchor_forward(batch): the model's outputs at the anchor. ``recomputed`` counts the forward passes
    spent recomputing outputs that were not kept.
    """

    def __init__(self, neighborhood, batches, anchor_forward, device, mode: str = "auto", memory_budget=None):
        self.neighborhood, self.batches, self.anchor_forward = neighborhood, batches, anchor_forward
        self.device, self.mode = torch.device(device), mode
        self.memory_budget, self._device_bytes = cache_budget(memory_budget, device), 0
        self.recomputed = 0
        with torch.no_grad():
            self.entries = [self._stored(neighborhood.prepare(anchor_forward(b), b)) for b in batches]
        self.total_weight = sum(c["weight"] for c in self.entries)
        if not self.total_weight > 0:
            raise ValueError("the evaluation data has no unmasked position (every attention_mask entry is 0)")
        # The cost's float32 rounding noise, in nats of the mean cost (see ``check_resolution``).
        self.noise_floor = sum(c.get("noise", 0.0) for c in self.entries) / max(self.total_weight, 1.0)
        self.largest_elements = max(c.get("elements", 1) for c in self.entries)

    def _stored(self, entry: dict) -> dict:
        if "log_probs" not in entry:
            return entry
        size = entry["log_probs"].numel() * entry["log_probs"].element_size()
        if self.mode == "recompute":
            del entry["log_probs"]
        elif self.mode == "cpu" or (self.mode == "auto" and self._device_bytes + size > self.memory_budget):
            entry["log_probs"] = entry["log_probs"].cpu()
        else:
            self._device_bytes += size
        return entry

    def __getitem__(self, k: int) -> dict:
        """Batch k's entry on the run device (its outputs recomputed from the anchor's weights if not kept)."""
        entry = self.entries[k]
        if "elements" not in entry:  # only the KL neighborhood caches outputs
            return entry
        if "log_probs" in entry:
            if entry["log_probs"].device == self.device:
                return entry
            return {**entry, "log_probs": entry["log_probs"].to(self.device, non_blocking=True)}
        # Only the log-probabilities: prepare's scalar figures would make the host wait for the device.
        log_probs = self.neighborhood.anchor_log_probs(self.anchor_forward(self.batches[k]))
        self.recomputed += 1
        return {**entry, "log_probs": log_probs}

    def placement(self) -> str:
        """Where the anchor's outputs ended up: "device", "cpu", "device+cpu", "recompute" or "none"."""
        places = {str(c["log_probs"].device.type) if "log_probs" in c else "recompute" for c in self.entries if "elements" in c}
        names = sorted({"device" if p == self.device.type else p for p in places})
        return "+".join(names) if names else "none"
