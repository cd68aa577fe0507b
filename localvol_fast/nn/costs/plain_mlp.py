"""Costs of plain MLPs (``nn.Sequential`` of ``nn.Linear`` and element-wise activations), probe-batched.

A probe is theta0 + t w_hat. Its first layer is (W1 + t V1) x + (b1 + t v1) = A1 + t U1, where
A1 = W1 x + b1 is computed once per run and U1 = V1 x + v1 once per direction, so each probe of a
direction costs an axpy instead of the first (and largest) matrix product. Later layers multiply by
W + t V for each probe (a batched product). Probes run in chunks small enough for their activations
to stay in cache. With the Triton backend every layer is instead the fused ``perturbed_linear``
kernel, which generates V from the seed inside the matrix product, so no perturbed weight exists.

The costs equal those of the generic functional path (``functional``) up to float32 rounding.
"""

from __future__ import annotations

import torch
from torch.func import vmap

from localvol_fast.nn.costs.functional import FunctionalModelCost

ELEMENTWISE = (
    torch.nn.GELU,
    torch.nn.ReLU,
    torch.nn.LeakyReLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.SiLU,
    torch.nn.ELU,
    torch.nn.Softplus,
    torch.nn.Identity,
    torch.nn.Dropout,  # identity in eval mode, which the estimator always uses
)
PROBE_CHUNK_ELEMENTS = 1 << 20  # activations per chunk of probes (about 4 MB of float32)


def plain_mlp_layers(model, layout):
    """[(linear, weight_offset, bias_offset | None) or activation] if ``model`` is a plain MLP whose every
    Linear weight and bias is perturbed, else None (subsets of parameters take the generic path)."""
    if type(model) is not torch.nn.Sequential or not len(model) or not isinstance(model[0], torch.nn.Linear):
        return None
    if _has_hooks(model):  # the factored path never calls the modules, so their hooks would be skipped
        return None
    layers, covered = [], set()  # parameter ids, not a count: a Linear used twice covers its parameters once
    for module in model:
        if isinstance(module, torch.nn.Linear):
            w_off = layout.start_of(module.weight)
            b_off = None if module.bias is None else layout.start_of(module.bias)
            if w_off is None or (module.bias is not None and b_off is None):
                return None
            covered.update(id(p) for p in (module.weight, module.bias) if p is not None)
            layers.append((module, w_off, b_off))
        elif isinstance(module, ELEMENTWISE):
            layers.append(module)
        else:
            return None
    return layers if len(covered) == len(layout) else None


def _has_hooks(model) -> bool:
    from torch.nn.modules import module as module_globals

    global_hooks = [getattr(module_globals, name, {}) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _plain_batches(batches) -> bool:
    return all(len(b.args) == 1 and not b.kwargs and b.args[0].dim() == 2 for b in batches)


class PlainMLPCost(FunctionalModelCost):
    """The cost of a plain MLP, evaluated directly from per-direction factors (module docstring).

    Only the anchor's own cost goes through the functional path it inherits."""

    @classmethod
    def supports(cls, model, batches, layout) -> bool:
        return plain_mlp_layers(model, layout) is not None and _plain_batches(batches)

    def __init__(self, model, batches, neighborhood, layout, backend, **options):
        super().__init__(model, batches, neighborhood, layout, backend, **options)
        self.layers = plain_mlp_layers(model, layout)
        self.mode = "fused-triton" if backend.name == "triton" else "mlp"
        # The anchor's weights come from the anchor copy, not the modules (a model may have changed them).
        self.weights = [self._anchor_slices(layer) for layer in self.layers if isinstance(layer, tuple)]
        w1, b1 = self.weights[0]
        with torch.no_grad():
            self.first_outputs = [torch.nn.functional.linear(b.args[0], w1, b1) for b in batches]
        self._buffers: dict = {}  # see _kept
        ones = lambda x: torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)  # noqa: E731
        self.first_inputs = [b.args[0] if b1 is None else torch.cat([b.args[0], ones(b.args[0])], 1) for b in batches]
        widest = max(m.out_features for m, *_ in (x for x in self.layers if isinstance(x, tuple)))
        rows = max(b.args[0].shape[0] for b in batches)
        self.probe_chunk = max(1, PROBE_CHUNK_ELEMENTS // (rows * widest))

    def start_batch(self, batch) -> None:
        super().start_batch(batch)
        if self.mode == "fused-triton" and not batch.diagonal:
            self.mode = "mlp"  # the fused kernel generates diagonal directions only; a run has one P
        if self.mode == "fused-triton":
            return
        directions = batch.unit_vectors(self.anchor.dtype)  # (B, D) w_hat
        self.factors = [self._split(directions, layer) for layer in self.layers if isinstance(layer, tuple)]
        first_v, first_vb = self.factors[0]
        if first_vb is not None:  # [V1 v1] [x; 1]: the bias rides in the product, not in a (B, n, out) copy
            first_v = torch.cat([first_v, first_vb[:, :, None]], dim=2)
        # U1 = V1 x + v1: (B, n, out), one batched product per data batch.
        self.first_direction_outputs = []
        for k, x in enumerate(self.first_inputs):
            out = self._kept(("U1", k), (first_v.shape[0], x.shape[0], first_v.shape[1]), first_v)
            x = x.expand(first_v.shape[0], *x.shape)
            self.first_direction_outputs.append(torch.bmm(x, first_v.transpose(1, 2), out=out))

    def _kept(self, key, shape, like) -> torch.Tensor:
        """An uninitialized ``shape`` tensor carved from a buffer kept under ``key`` between calls: a fresh
        large tensor per call costs about as much in page faults as the arithmetic that fills it."""
        kept = self._buffers.get(key)
        if kept is None or kept.shape[0] < shape[0] or kept.shape[1:] != shape[1:] or kept.dtype != like.dtype:
            kept = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return kept[: shape[0]]

    def _anchor_slices(self, layer):
        module, w_off, b_off = layer
        w = self.anchor[w_off : w_off + module.weight.numel()].view_as(module.weight)
        b = None if b_off is None else self.anchor[b_off : b_off + module.out_features]
        return w, b

    @staticmethod
    def _split(directions, layer):
        """Direction pieces of one Linear layer: V (B, out, in) and v (B, out) or None."""
        module, w_off, b_off = layer
        v = directions[:, w_off : w_off + module.weight.numel()].reshape(-1, *module.weight.shape)
        vb = None if b_off is None else directions[:, b_off : b_off + module.out_features]
        return v, vb

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        device = self.anchor.device
        # Host values go over before any work is queued (a copy from pageable memory may wait for it).
        steps = radii.to(device, torch.float64, non_blocking=True)
        if self.mode == "fused-triton":
            indices, scales = self.batch.probe_arguments(rows, radii)
        else:
            rows_d, t = rows.to(device, non_blocking=True), steps.to(self.anchor.dtype)
        total = torch.zeros(rows.numel(), dtype=torch.float64, device=device)
        for k, batch in enumerate(self.batches):
            cache = self.cache_of(k)
            for lo in range(0, rows.numel(), self.probe_chunk):
                sl = slice(lo, lo + self.probe_chunk)
                if self.mode == "fused-triton":
                    logits = self._forward_fused(batch.args[0], indices[sl], scales[sl])
                else:
                    logits = self._forward_factored(k, rows_d[sl], t[sl])
                values = vmap(lambda out: self.neighborhood.per_probe(out, batch))(logits)
                total[sl] += self.neighborhood.combine(values, cache, self.backend)
            self.probe_forwards += 1
        return self.with_l2_along_rays(total / self.total_weight, steps)

    def _forward_factored(self, batch_number: int, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        first = self.first_direction_outputs[batch_number]
        h = torch.index_select(first, 0, rows, out=self._kept("h1", (rows.numel(), *first.shape[1:]), first))
        h = torch.addcmul(self.first_outputs[batch_number], t[:, None, None], h, out=h)  # A1 + t U1[row]
        linear_number = 1
        for layer in self.layers[1:]:
            if not isinstance(layer, tuple):
                h = layer(h)
                continue
            v, vb = self.factors[linear_number]
            weight, bias = self.weights[linear_number]
            linear_number += 1
            probe_weight = torch.addcmul(weight, t[:, None, None], v[rows]).transpose(-1, -2)
            if vb is None:
                h = torch.bmm(h, probe_weight)
            else:
                h = torch.baddbmm(torch.addcmul(bias, t[:, None], vb[rows])[:, None, :], h, probe_weight)
        return h

    def _forward_fused(self, x: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        precond = self.batch.precond
        h = x.unsqueeze(0).expand(indices.numel(), *x.shape)
        anchor_weights = iter(self.weights)
        for layer in self.layers:
            if not isinstance(layer, tuple):
                h = layer(h)
                continue
            module, w_off, b_off = layer
            weight, bias = next(anchor_weights)
            p_w = None if precond is None else precond[w_off : w_off + weight.numel()].reshape(weight.shape)
            p_b = None if precond is None or b_off is None else precond[b_off : b_off + module.out_features]
            h = self.backend.perturbed_linear(
                h, weight, bias, p_w, p_b, self.batch.seed, indices, scales, w_off, 0 if b_off is None else b_off
            )
        return h
