"""The sequential estimator on a model: the surrogate's curvature, and the run (``estimate(method="sequential")``).

The sequential method (``engine.sequential``) starts from the quadratic surrogate
C_q = (1/2)(theta - theta0)^T H (theta - theta0) and bridges to the model's true cost, so H only has to be
a good guess: a poor one costs steps, not correctness. For the KL neighborhood the Hessian at the anchor
is the output Fisher (``nn.curvature``), which is what ``curvature="auto"`` uses:
- "fisher-eigen": the exact output Fisher, eigendecomposed (a classifier with D <= ``AUTO_EIGEN_LIMIT``
  under "auto"; up to ``MAX_DENSE_DIM`` when asked by name: D x D float64 memory, an O(D^3) solve);
- "diag-h": its exact diagonal (a classifier called as model(x));
- "fisher": the diagonal from ``fisher_passes`` sampled-label backward passes (any model: LMs too).
"auto" takes the first of these the model allows. A (D,) tensor (a diagonal H) or an
(eigenvalues (k,), vectors (D, k)) pair is used as given.

The run moves its particles by HMC on the model's gradients (``nn.costs.gradients.PointGradients``:
one forward and one backward pass per particle and leapfrog step, whatever evaluator the ray method
would use). It runs without the engine's pilot: on the digits MLP (D = 4,810, the KL on 256 inputs) the
pilot's fitted diagonal Gaussian was a far worse start than the surrogate's (its draws had a mean KL
of 1.9 against the cutoff 0.01, and the main bridge had reached only alpha = 0.22 after 53 steps and
0.97 M evaluations), while the pilot itself, started from the surrogate, landed in 108 steps.
"""

from __future__ import annotations

import time

import torch

from localvol_fast.core.checks import check_choice
from localvol_fast.engine.sequential import SequentialSampler
from localvol_fast.engine.sequential_checkpoint import run_checkpointed
from localvol_fast.nn.costs.gradients import PointGradients
from localvol_fast.nn.fisher import fisher_diagonal
from localvol_fast.nn.preconditioners import exact_curvature

CURVATURE_NAMES = ("auto", "fisher-eigen", "diag-h", "fisher")
AUTO_EIGEN_LIMIT = 5_000  # above this, "auto" takes the diagonal: the D x D eigendecomposition takes minutes


def check_curvature_option(curvature) -> None:
    """curvature: a name of ``CURVATURE_NAMES``, a (D,) tensor or an (eigenvalues, vectors) pair of tensors
    (their sizes are checked by the sampler once D is known)."""
    if isinstance(curvature, str):
        check_choice(curvature, CURVATURE_NAMES, "curvature")
    elif isinstance(curvature, torch.Tensor):
        pass
    elif not (isinstance(curvature, (tuple, list)) and len(curvature) == 2 and all(isinstance(t, torch.Tensor) for t in curvature)):
        raise TypeError(
            f"curvature must be one of {', '.join(map(repr, CURVATURE_NAMES))}, a (D,) torch.Tensor (a diagonal "
            f"Hessian) or an (eigenvalues, vectors) pair of tensors, got {type(curvature).__name__}"
        )


def surrogate_curvature(curvature, model, layout, forward, batches, *, passes: int, seed: int) -> tuple[object, dict]:
    """(curvature for the sampler, info): the named curvature computed at the anchor, or the user's as given.
    "auto" tries the exact output Fisher (eigen up to ``AUTO_EIGEN_LIMIT``, else diagonal) and falls back to
    the sampled diagonal where the model is not a classifier called as model(x) (the reason goes in info)."""
    if not isinstance(curvature, str):
        return curvature, {"name": "user"}
    started = time.perf_counter()
    info = {}
    if curvature == "auto":
        info["chosen_by"] = "auto"
        names = ("fisher-eigen" if layout.dim <= AUTO_EIGEN_LIMIT else "diag-h", "fisher")
    else:
        names = (curvature,)
    for name in names:
        try:
            value = _named_curvature(name, model, layout, forward, batches, passes=passes, seed=seed, info=info)
            break
        except ValueError as why:  # the exact Fisher's own message: logits or batches of another form
            if name == names[-1]:
                raise
            info["exact_fisher_unavailable"] = str(why)
    info.update(name=name, seconds=time.perf_counter() - started)
    return value, info


def _named_curvature(name: str, model, layout, forward, batches, *, passes: int, seed: int, info: dict):
    if name in ("fisher-eigen", "diag-h"):  # the exact output Fisher, as the preconditioners compute it
        return exact_curvature("hessian-eigen" if name == "fisher-eigen" else "diag-h", model, layout, batches)
    value, info["backward_passes"] = fisher_diagonal(forward, layout, batches, passes=passes, seed=seed)
    return value


def run_sequential(cost, options, *, sigma: float, curvature, scope: str, n_replicates: int, moves_per_step: int,
                   start_cutoff: float | None, max_evaluations: int | None, run_info: dict | None):
    """The sequential estimate on ``cost`` (a ``ModelCost``: its ``costs_of_points`` evaluates the whole
    population in batches, ``PointGradients`` its gradients for the HMC moves) with the checked
    ``RunOptions`` (n_samples = particles per replicate)."""
    sampler = SequentialSampler(
        cost.costs_of_points, cost.anchor, cutoff=list(options.cutoffs), sigma=sigma, curvature=curvature,
        scope=scope, n_particles=options.n_samples, n_replicates=n_replicates, moves_per_step=moves_per_step,
        start_cutoff=start_cutoff, seed=options.seed,
        max_evaluations=max_evaluations, batch_size=options.batch_size, kernel="hmc", gradient=PointGradients(cost),
    )
    if options.output is None:
        return sampler.run(progress=options.progress)
    return run_checkpointed(sampler, output=options.output, resume=options.resume, run_info=run_info,
                            progress=options.progress)
