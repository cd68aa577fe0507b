"""The diagonal Fisher information of a model's output distribution at the anchor, for preconditioning.

F_ii = E_x E_{y ~ p(.|x)} [(d/dtheta_i log p(y|x))^2], averaged over evaluation positions. Labels are
sampled from the anchor's own predictions. For one batch with independently sampled labels the
squared gradient of the summed log-likelihood is an unbiased estimate of the sum of the per-position
diagonals (the cross terms have mean zero), so each backward pass covers a whole batch.
"""

from __future__ import annotations

import torch

from localvol_fast.nn.neighborhoods import output_logits


def fisher_diagonal(forward, layout, batches, *, passes: int = 16, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Mean per-position diagonal Fisher (D,) float64 from ``passes`` backward passes over ``batches``.

    forward(batch) runs the model on a batch; layout: the perturbed parameters (``ParameterLayout``).
    Returns (diagonal, number of backward passes).
    """
    params = layout.params
    total = torch.zeros(layout.dim, dtype=torch.float64, device=params[0].device)
    generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
    positions = 0.0
    for k in range(passes):
        batch = batches[k % len(batches)]
        with torch.enable_grad():
            logits = output_logits(forward(batch)).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            flat = log_probs.reshape(-1, log_probs.shape[-1])
            with torch.no_grad():
                labels = torch.multinomial(flat.exp().cpu(), 1, generator=generator).to(flat.device)
            picked = flat.gather(1, labels).reshape(log_probs.shape[:-1])
            if batch.mask is not None and picked.dim() == batch.mask.dim():
                picked = picked * batch.mask
                positions += float(batch.mask.sum())
            else:
                positions += picked.numel()
            grads = torch.autograd.grad(picked.sum(), params, allow_unused=True)
        for g, (_, lo, hi) in zip(grads, layout.spans()):
            if g is not None:
                total[lo:hi] += g.detach().reshape(-1).double() ** 2
    return total / max(positions, 1.0), passes
