"""HesScale (Elsayed & Mahmood 2022): an approximate diagonal of the KL's Hessian at the anchor, for plain MLPs.

The cost is the mean over data rows of KL(anchor || theta). Its Hessian w.r.t. one row's logits at the
anchor is diag(p) - p p^T (p: the anchor's softmax); HesScale keeps its diagonal p (1 - p) and carries
diagonals backwards, layer by layer, dropping every off-diagonal term on the way:
- a Linear z = W a + b: d2/dW_ij2 = h_i a_j^2, d2/db_i2 = h_i, and into its input h_a_j = sum_i W_ij^2 h_i;
- an element-wise activation a = sigma(z): h_z = sigma'(z)^2 h_a + sigma''(z) g_a, with g_a the first
  derivative of the cost w.r.t. a. At the anchor the KL's gradient w.r.t. the logits is p - p = 0, so every
  g_a is 0 and the sigma'' term vanishes: only sigma'(z)^2 h_a is kept (for a loss, not the KL, it would not).
The last Linear layer's weights and biases get the exact diagonal (the logits are linear in them); earlier
layers are an approximation (the off-diagonal parts of diag(p) - p p^T and of the inner Hessians are lost).
The result is averaged over the data rows, as the KL is. All of it runs in float64, one batch at a time.
"""

from __future__ import annotations

import torch

from localvol_fast.nn.costs.plain_mlp import ELEMENTWISE


def _plain_layers(model) -> list:
    """The modules of a plain MLP (``nn.Sequential`` of ``nn.Linear`` and element-wise activations)."""
    modules = list(model) if type(model) is torch.nn.Sequential else []
    if not modules or not all(isinstance(m, (torch.nn.Linear, *ELEMENTWISE)) for m in modules):
        kinds = [type(m).__name__ for m in modules] if modules else type(model).__name__
        raise ValueError(
            "the HesScale preconditioner is implemented for plain MLPs (an nn.Sequential of nn.Linear and "
            f"element-wise activations), got {kinds}; use preconditioner='fisher' for other models"
        )
    return modules


def _batch_input(batch, number: int) -> torch.Tensor:
    """The (N, features) input of a batch; masked or keyword inputs are not a plain MLP's."""
    if len(batch.args) != 1 or batch.kwargs or batch.mask is not None or batch.args[0].dim() != 2:
        raise ValueError(
            f"the HesScale preconditioner needs batches of one (N, features) input tensor; batch {number} is not"
        )
    return batch.args[0].double()


def _forward(modules, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Each module's input (what the backward pass of diagonals needs), and the logits."""
    inputs, a = [], x
    with torch.no_grad():
        for m in modules:
            inputs.append(a)
            if isinstance(m, torch.nn.Linear):
                a = torch.nn.functional.linear(a, m.weight.double(), None if m.bias is None else m.bias.double())
            else:
                a = m(a)
    return inputs, a


def _derivative(activation, z: torch.Tensor) -> torch.Tensor:
    """sigma'(z) element by element: for an element-wise map the gradient of sum(sigma(z)) is sigma'(z)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(activation(z).sum(), z)
    return slope


def _batch_diagonals(modules, x: torch.Tensor) -> dict:
    """{id(parameter): (parameter, summed HesScale diagonal over the batch's rows)} for one batch."""
    inputs, logits = _forward(modules, x)
    p = torch.softmax(logits, dim=-1)
    h = p * (1 - p)  # the diagonal of diag(p) - p p^T, the KL's exact Hessian w.r.t. one row's logits
    found = {}
    for m, a in zip(reversed(modules), reversed(inputs)):
        if isinstance(m, torch.nn.Linear):
            weight = m.weight.detach().double()
            pieces = [(m.weight, h.T @ a.square())] + ([(m.bias, h.sum(0))] if m.bias is not None else [])
            for param, values in pieces:  # a Linear used twice adds its uses (their cross terms are dropped)
                old = found.get(id(param), (param, 0.0))[1]
                found[id(param)] = (param, old + values)
            h = h @ weight.square()
        else:
            h = _derivative(m, a).square() * h  # the sigma'' g term is 0: g = 0 at the anchor (module docstring)
    return found


def hesscale_diagonal(model: torch.nn.Module, layout, batches) -> torch.Tensor:
    """The HesScale diagonal (D,) float64 of the mean KL(anchor || theta)'s Hessian at the anchor.

    model: a plain MLP (anything else is a ValueError); layout: the perturbed parameters
    (``ParameterLayout``; parameters it does not hold are skipped); batches: the evaluation batches.
    """
    modules = _plain_layers(model)
    total = torch.zeros(layout.dim, dtype=torch.float64, device=layout.params[0].device)
    rows = 0
    for number, batch in enumerate(batches):
        x = _batch_input(batch, number)
        for param, values in _batch_diagonals(modules, x).values():
            start = layout.start_of(param)
            if start is not None:
                total[start : start + param.numel()] += values.reshape(-1).to(total.device)
        rows += x.shape[0]
    return total / max(rows, 1)
