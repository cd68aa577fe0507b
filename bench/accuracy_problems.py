"""The problems of the accuracy benchmark (``bench/accuracy.py``): costs with a known log volume.

Every problem is a cost C >= 0 of (B, D) float64 points with C(theta0) = 0, the anchor theta0, the
Gaussian prior N(0, sigma^2 I) about the origin, a cutoff eps, the curvature at the anchor that every
method is given (eigenvalues lambda, and the eigenvectors Q where the problem has them; ``vectors=None``
means the coordinate axes), and the truth log P(C(theta) <= eps), theta ~ prior, in nats, with its own
standard error. A method sees the cost only through batched evaluations (``CountedCost`` counts them).

The problems (MATH.md, "Ground truth for quadratic neighborhoods"):
- ``digits-fisher``: C = (1/2) (theta - theta0)^T F (theta - theta0), F the exact output Fisher of the
  paper's digits MLP (``train_paper_digits(seed=0)``, D = 4,810) at its trained weights theta0, eps 1e-2,
  sigma = 1 / sqrt(5e-4 * 1024) = 1.3975. Evaluated through the eigenbasis: y = Q^T theta, then
  C = (1/2) sum_i lambda_i (y_i - y0_i)^2 (negative rounding eigenvalues set to 0 in cost and truth alike).
  Truth: generalized chi-square saddlepoint (``core.ground_truth.quadratic_log_volume``).
- ``digits-quartic-1e-3``, ``digits-quartic-1e-2``: the same plus kappa sum_i (y_i - y0_i)^4, a term that
  bounds the flat directions as a network's nonlinearity does; truth by per-coordinate quadrature
  (``separable_log_volume``).
- ``powerlaw-1e4``, ``powerlaw-1e6``: diagonal C = (1/2) sum_i lambda_i (theta_i - theta0_i)^2 with
  lambda_i = 3 i^-2 (i = 1..D), sigma = 1, eps = 1e-2, theta0 = sigma z, z ~ N(0, I_D) drawn by
  ``torch.Generator().manual_seed(1)`` in float64. About 350 coordinates bind (truth about -385 and -397).
- ``banana-2d``: C = (1/2) [(u_1 / 5)^2 + ((u_2 + 6 u_1^2) / 0.5)^2], u = theta - theta0,
  theta0 = (0.5, -0.3), sigma = 1, eps = 1e-2: a bent set, not star-shaped about theta0 (a ray that
  leaves it can re-enter). Curvature given: the Hessian at theta0, diag(1/25, 4).
- ``coupled-quartic-5d``: C = (1/2) u^T H u + kappa |u|^4, H = R diag(10^1, 10^0, .., 10^-3) R^T with R a
  seeded random rotation (QR of a Gaussian matrix, seed 3), kappa = 0.05, theta0 = (0.3, -0.2, 0.1, 0.4,
  -0.1), sigma = 1, eps = 5e-2: the quartic couples every pair of coordinates (not separable in any
  basis). Curvature given: H's eigenvalues and R.
  Truth of both: plain Monte Carlo from the prior (``monte_carlo_log_volume``), 4e6 samples (the
  benchmark's --quick: 5e5), seed 12345.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from localvol_fast.apps.digits import PRIOR_SIGMA, train_paper_digits
from localvol_fast.nn.curvature import eigen_decomposition, output_fisher_matrix
from localvol_fast.nn.parameters import ParameterLayout

try:  # written at the same time as this benchmark; the Monte Carlo problems do not need it
    from localvol_fast.core import ground_truth, separable
except ImportError:  # pragma: no cover - only before localvol_fast/core/ground_truth.py exists
    ground_truth = separable = None

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SHARED_FISHER_CACHE = Path("/tmp/digits_fisher_seed0.pt")  # written by the ground-truth work, if present
FISHER_CACHE_NAME = "digits_fisher_seed0.pt"
TRUTHS_CACHE_NAME = "truths.json"
MC_SAMPLES = 4_000_000
MC_SEED = 12345
_MC_CHUNK = 250_000


@dataclass
class Truth:
    """The exact log volume of a problem (nats), its standard error and how it was computed."""

    log_volume: float
    standard_error: float
    method: str
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


class CountedCost:
    """The problem's cost as a method sees it: (B, D) -> (B,), counting every row it evaluates."""

    def __init__(self, cost: Callable[[torch.Tensor], torch.Tensor]):
        self._cost = cost
        self.evaluations = 0

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.reshape(-1, theta.shape[-1]) if theta.dim() > 1 else theta.reshape(1, -1)
        self.evaluations += theta.shape[0]
        return self._cost(theta.double())


@dataclass
class Problem:
    """One benchmark problem (module docstring). ``truth_fn`` computes the truth once, on first use.

    cost: (B, D) float64 -> (B,) float64. anchor: (D,) float64. eigenvalues: (D,) float64 >= 0, the
    curvature at the anchor; vectors: (D, D) orthonormal eigenvectors, or None (the coordinate axes).
    small: cheap enough for the smoke test. recipe: how the problem is built, in words.
    """

    name: str
    cost: Callable[[torch.Tensor], torch.Tensor]
    anchor: torch.Tensor
    sigma: float
    cutoff: float
    eigenvalues: torch.Tensor
    vectors: torch.Tensor | None
    truth_fn: Callable[[], Truth]
    recipe: str
    small: bool = False
    truth_key: str | None = None  # a digest of the truth's inputs: the cache's key (None: never cached)
    _truth: Truth | None = None

    @property
    def dim(self) -> int:
        return self.anchor.numel()

    def truth(self) -> Truth:
        """The truth, from ``bench/.cache/truths.json`` when the same inputs were solved before."""
        if self._truth is None:
            self._truth = _cached_truth(self.truth_key)
        if self._truth is None:
            started = time.perf_counter()
            self._truth = self.truth_fn()
            self._truth.seconds = time.perf_counter() - started
            _store_truth(self.truth_key, self._truth)
        return self._truth

    def counted(self) -> CountedCost:
        return CountedCost(self.cost)

    def hessian_diagonal(self) -> torch.Tensor:
        """diag H = sum_j Q_ij^2 lambda_j (D,): what a diagonal (Fisher-like) preconditioner is built from."""
        if self.vectors is None:
            return self.eigenvalues.clone()
        return (self.vectors**2) @ self.eigenvalues


def digest(*parts) -> str:
    """sha256 of tensors' float64 bytes and of the repr of everything else: a truth's cache key."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().double().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:24]


def _truths_file() -> Path:
    return CACHE_DIR / TRUTHS_CACHE_NAME


def _cached_truth(key: str | None) -> Truth | None:
    if key is None or not _truths_file().exists():
        return None
    entry = json.loads(_truths_file().read_text()).get(key)
    if entry is None:
        return None
    details = {**entry["details"], "cached": "computed earlier for the same inputs (bench/.cache/truths.json)"}
    return Truth(entry["log_volume"], entry["standard_error"], entry["method"], details, entry["seconds"])


def _store_truth(key: str | None, truth: Truth) -> None:
    if key is None:
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    table = json.loads(_truths_file().read_text()) if _truths_file().exists() else {}
    table[key] = {"log_volume": truth.log_volume, "standard_error": truth.standard_error, "method": truth.method,
                  "details": truth.details, "seconds": truth.seconds}
    tmp = _truths_file().with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(_truths_file())


# ----- the digits Fisher --------------------------------------------------------------------------


def digits_fisher_spectrum(cache_dir: Path = CACHE_DIR, log=print) -> dict:
    """The digits MLP's exact output Fisher at its trained weights, in its eigenbasis.

    Returns {"eigenvalues": (D,), "vectors": (D, D), "anchor": (D,), "anchor_coords": Q^T theta0 (D,),
    "sigma": float}, float64. Read from ``/tmp/digits_fisher_seed0.pt`` or ``cache_dir`` when present,
    otherwise built in-process (train, Fisher, eigh: minutes on 2 cores) and saved to ``cache_dir``.
    """
    for path in (SHARED_FISHER_CACHE, cache_dir / FISHER_CACHE_NAME):
        if path.exists():
            data = torch.load(path, map_location="cpu", weights_only=True)
            if {"eigenvalues", "vectors", "anchor"} <= set(data):
                return _complete_spectrum(data)
            log(f"[accuracy] {path} lacks eigenvalues/vectors/anchor; rebuilding")
    spectrum = build_digits_fisher_spectrum(log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / (FISHER_CACHE_NAME + f".{os.getpid()}.tmp")
    torch.save(spectrum, tmp)
    tmp.replace(cache_dir / FISHER_CACHE_NAME)  # atomic: a concurrent run never reads half a file
    return spectrum


def build_digits_fisher_spectrum(log=print) -> dict:
    """Train the paper's digits MLP (seed 0) and eigendecompose its exact output Fisher (float64)."""
    started = time.perf_counter()
    run = train_paper_digits(seed=0)
    layout = ParameterLayout(run.model.named_parameters())
    fisher = output_fisher_matrix(run.model, layout, run.x_train)  # a tensor of inputs (N, 64)
    log(f"[accuracy] digits Fisher built in {time.perf_counter() - started:.0f} s; eigendecomposing")
    values, vectors = eigen_decomposition(fisher)
    del fisher
    anchor = layout.flatten().detach().double()
    log(f"[accuracy] digits Fisher spectrum ready after {time.perf_counter() - started:.0f} s")
    return _complete_spectrum(
        {"eigenvalues": values, "vectors": vectors.contiguous(), "anchor": anchor, "sigma": PRIOR_SIGMA}
    )


def _complete_spectrum(data: dict) -> dict:
    out = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    if "anchor_coords" not in out:
        out["anchor_coords"] = out["vectors"].T @ out["anchor"]
    out["sigma"] = float(out.get("sigma", PRIOR_SIGMA))
    return out


def _eigen_cost(vectors: torch.Tensor | None, anchor_coords: torch.Tensor, eigenvalues: torch.Tensor, quartic: float):
    """C(theta) = sum_i (1/2) lam_i (y_i - y0_i)^2 + kappa (y_i - y0_i)^4, y = Q^T theta (y = theta if Q None)."""

    def cost(theta: torch.Tensor) -> torch.Tensor:
        y = theta if vectors is None else theta @ vectors  # rows: (Q^T theta_b)^T
        u = (y - anchor_coords).square_()
        out = 0.5 * (u @ eigenvalues)
        if quartic:
            out += quartic * u.square_().sum(1)
        return out

    return cost


def _quadratic_truth(eigenvalues, anchor_coords, cutoff, sigma, tilted_samples: int):
    """Saddlepoint (Lugannani-Rice) truth, cross-checked by tilted importance sampling when it is given
    samples; the tilted figure (exact, unbiased, with a standard error) is the truth when it ran."""

    def truth() -> Truth:
        _need_ground_truth()
        lr = ground_truth.quadratic_log_volume(eigenvalues, anchor_coords, cutoff=cutoff, sigma=sigma, method="lugannani-rice")
        details = {"lugannani_rice": lr.log_volume}
        if not tilted_samples:
            return Truth(lr.log_volume, 0.0, "lugannani-rice (deterministic: standard error 0, approximation error "
                         "not included)", details)
        tilted = ground_truth.tilted_log_volume(
            eigenvalues, anchor_coords, cutoff=cutoff, sigma=sigma, n_samples=tilted_samples, seed=MC_SEED
        )
        details.update(tilted_samples=tilted_samples, tilted_minus_lugannani_rice=tilted.log_volume - lr.log_volume)
        return Truth(tilted.log_volume, tilted.standard_error, "tilted importance sampling", details)

    return truth


def _separable_truth(eigenvalues, anchor_coords, cutoff, sigma, quartic, tilted_samples: int):
    """Per-coordinate quadrature + saddlepoint (Lugannani-Rice), cross-checked by tilted sampling."""

    def truth() -> Truth:
        _need_ground_truth()
        common = dict(cutoff=cutoff, quartic=quartic, prior="gaussian", sigma=sigma)
        lr = ground_truth_separable(eigenvalues, anchor_coords, method="lugannani-rice", **common)
        details = {"lugannani_rice": lr.log_volume, "quadrature_error": lr.details.get("quadrature_error")}
        if not tilted_samples:
            return Truth(lr.log_volume, 0.0, "quadrature + lugannani-rice (deterministic)", details)
        tilted = ground_truth_separable(
            eigenvalues, anchor_coords, method="tilted", n_samples=tilted_samples, seed=MC_SEED, **common
        )
        details.update(tilted_samples=tilted_samples, tilted_minus_lugannani_rice=tilted.log_volume - lr.log_volume)
        return Truth(tilted.log_volume, tilted.standard_error, "tilted importance sampling (quadrature proposal)", details)

    return truth


def _need_ground_truth() -> None:
    if ground_truth is None:
        raise RuntimeError("localvol_fast.core.ground_truth is missing: the quadratic problems' truth needs it")


def ground_truth_separable(*args, **kwargs):
    return separable.separable_log_volume(*args, **kwargs)


def digits_problems(spectrum: dict, eigen_coordinates: bool, tilted_samples: int) -> list[Problem]:
    """The three digits-Fisher problems, in the network's coordinates (cost through Q) or in the
    eigenbasis itself (theta := y, Q = I: the same problem up to a rotation, which leaves the prior,
    the truth and every rotation-equivariant method's law unchanged, at a diagonal's cost)."""
    lam = spectrum["eigenvalues"].clamp_min(0.0)  # tiny negatives of a PSD matrix are rounding
    y0 = spectrum["anchor_coords"]
    sigma = spectrum["sigma"]
    vectors = None if eigen_coordinates else spectrum["vectors"]
    anchor = y0.clone() if eigen_coordinates else spectrum["anchor"]
    suffix = "-eig" if eigen_coordinates else ""
    where = ("in its eigen-coordinates (theta := Q^T theta, Q = I; a rotation of the same problem)"
             if eigen_coordinates else "in the network's coordinates, evaluated through y = Q^T theta (a D x D matmul)")
    problems = [Problem(
        f"digits-fisher{suffix}", _eigen_cost(vectors, y0, lam, 0.0), anchor, sigma, 1e-2, lam, vectors,
        _quadratic_truth(lam, y0, 1e-2, sigma, tilted_samples),
        truth_key=digest("quadratic", lam, y0, 1e-2, sigma, tilted_samples, MC_SEED),
        recipe=f"(1/2)(theta - theta0)^T F (theta - theta0), F the digits MLP's exact output Fisher, {where}",
    )]
    for kappa in (1e-3, 1e-2):
        problems.append(Problem(
            f"digits-quartic-{kappa:g}{suffix}", _eigen_cost(vectors, y0, lam, kappa), anchor, sigma, 1e-2, lam,
            vectors, _separable_truth(lam, y0, 1e-2, sigma, kappa, tilted_samples),
            truth_key=digest("separable", lam, y0, 1e-2, sigma, kappa, tilted_samples, MC_SEED),
            recipe=f"the digits Fisher quadratic + {kappa:g} sum_i (y_i - y0_i)^4, {where}",
        ))
    return problems


# ----- synthetic power-law spectra ---------------------------------------------------------------

POWERLAW_SCALE, POWERLAW_EXPONENT, POWERLAW_SEED = 3.0, 2.0, 1


def powerlaw_problem(dim: int, tilted_samples: int) -> Problem:
    """Diagonal C with lambda_i = 3 i^-2, sigma 1, eps 1e-2, theta0 = z ~ N(0, I) (seed 1)."""
    lam = POWERLAW_SCALE * torch.arange(1, dim + 1, dtype=torch.float64).pow(-POWERLAW_EXPONENT)
    anchor = torch.randn(dim, generator=torch.Generator().manual_seed(POWERLAW_SEED), dtype=torch.float64)
    return Problem(
        f"powerlaw-{dim:.0e}".replace("+0", ""), _eigen_cost(None, anchor, lam, 0.0), anchor, 1.0, 1e-2, lam, None,
        _quadratic_truth(lam, anchor, 1e-2, 1.0, tilted_samples),
        truth_key=digest("quadratic", lam, anchor, 1e-2, 1.0, tilted_samples, MC_SEED),
        recipe=f"diagonal, lambda_i = {POWERLAW_SCALE:g} i^-{POWERLAW_EXPONENT:g}, D = {dim:,}, sigma 1, theta0 ~ N(0, I) "
        f"(torch.Generator seed {POWERLAW_SEED}, float64)",
        small=dim <= 10_000,
    )


# ----- low-dimensional non-quadratic costs, Monte Carlo truth ------------------------------------


def monte_carlo_log_volume(cost, dim: int, sigma: float, cutoff: float, n_samples: int = MC_SAMPLES, seed: int = MC_SEED) -> Truth:
    """log P(C(theta) <= eps), theta ~ N(0, sigma^2 I), by plain Monte Carlo: log of the hit fraction p,
    standard error sqrt((1 - p) / (n p)) (delta method), nats."""
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, n_samples, _MC_CHUNK):
        rows = min(_MC_CHUNK, n_samples - start)
        theta = sigma * torch.randn(rows, dim, generator=generator, dtype=torch.float64)
        hits += int((cost(theta) <= cutoff).sum())
    if hits == 0:
        raise RuntimeError(f"no Monte Carlo sample of {n_samples:,} fell inside: P is too small for plain Monte Carlo")
    p = hits / n_samples
    return Truth(math.log(p), math.sqrt((1 - p) / (n_samples * p)), "plain Monte Carlo from the prior",
                 {"n_samples": n_samples, "hits": hits, "seed": seed})


def banana_problem(mc_samples: int = MC_SAMPLES) -> Problem:
    anchor = torch.tensor([0.5, -0.3], dtype=torch.float64)
    wide, narrow, bend = 5.0, 0.5, 6.0

    def cost(theta: torch.Tensor) -> torch.Tensor:
        u = theta - anchor
        return 0.5 * ((u[:, 0] / wide) ** 2 + ((u[:, 1] + bend * u[:, 0] ** 2) / narrow) ** 2)

    lam = torch.tensor([wide**-2, narrow**-2], dtype=torch.float64)
    return Problem(
        "banana-2d", cost, anchor, 1.0, 1e-2, lam, None, lambda: monte_carlo_log_volume(cost, 2, 1.0, 1e-2, mc_samples),
        "(1/2)[(u1/5)^2 + ((u2 + 6 u1^2)/0.5)^2], u = theta - (0.5, -0.3); Hessian at theta0 diag(1/25, 4)",
        truth_key=digest("banana", wide, narrow, bend, anchor, mc_samples, MC_SEED),
        small=True,
    )


def coupled_quartic_problem(mc_samples: int = MC_SAMPLES) -> Problem:
    dim, kappa = 5, 0.05
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    lam = 10.0 ** -torch.arange(-1, dim - 1, dtype=torch.float64)  # 10, 1, 0.1, 0.01, 0.001
    hessian = rotation @ torch.diag(lam) @ rotation.T
    anchor = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.1], dtype=torch.float64)

    def cost(theta: torch.Tensor) -> torch.Tensor:
        u = theta - anchor
        return 0.5 * ((u @ hessian) * u).sum(1) + kappa * u.square().sum(1).square()

    return Problem(
        "coupled-quartic-5d", cost, anchor, 1.0, 5e-2, lam, rotation,
        lambda: monte_carlo_log_volume(cost, dim, 1.0, 5e-2, mc_samples),
        "(1/2) u^T H u + 0.05 |u|^4, H = R diag(10, 1, .1, .01, .001) R^T (R: QR of a seed-3 Gaussian), "
        "u = theta - (0.3, -0.2, 0.1, 0.4, -0.1)",
        truth_key=digest("coupled-quartic", hessian, kappa, anchor, 5e-2, mc_samples, MC_SEED),
        small=True,
    )
