"""Measures of parameter space and the per-direction volume estimates (MATH.md, "Measures", "Polar").

For a unit direction w_hat = P g / |P g| whose ray leaves the neighborhood at radius r, the estimate is

    log A_{D-1} + log integral_0^r m(theta0 + t w_hat) t^(D-1) dt  -  D log|w|  +  log det P,

|w| = |P g| / |g| (the "prop"). The measures below supply the middle term; the estimator adds the
importance correction. All arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from localvol_fast.core.checks import check_positive_vector
from localvol_fast.core.radial import log_ball_volume, log_radial_integral, log_sphere_area

# Beyond t* + _GAUSSIAN_TAIL_WIDTHS / sqrt(a) the Gaussian radial integrand holds less than
# e^-70 of its mass (its log is concave with curvature <= -a), so searching further changes nothing.
_GAUSSIAN_TAIL_WIDTHS = 12.0
# Lebesgue rays still inside the neighborhood this far out (times max(|theta0|, 1)) count as infinite.
_LEBESGUE_MAX_RADIUS_FACTOR = 1e6
# The measures work with 1 / sigma^2 and bounds^2 in float64: outside this range the squares under- or
# overflow (sqrt of the smallest normal float64 is 1.5e-154, of the largest 1.3e154), so such a sigma
# or bound is refused with this range instead of dividing by zero or overflowing mid-run.
SCALE_LIMITS = (1e-150, 1e150)
_SCALE_WHY = " (its square must be a normal float64)"


@dataclass(frozen=True)
class DirectionStats:
    """Sufficient statistics of a batch of directions, each (B,) float64 (``ops.direction_stats``)."""

    sq_norm_g: torch.Tensor  # |g|^2
    sq_norm_pg: torch.Tensor  # |P g|^2
    dot_anchor: torch.Tensor  # sum_i (P g)_i theta0_i nu_i   (nu = measure weights, ones if none)
    sq_norm_weighted: torch.Tensor  # sum_i (P g)_i^2 nu_i
    box_exit_factor: torch.Tensor  # step along P g that leaves the box (inf without one)

    @classmethod
    def from_tensor(cls, stats: torch.Tensor) -> "DirectionStats":
        return cls(*(stats[:, k].double() for k in range(5)))

    @property
    def props(self) -> torch.Tensor:
        """|w| = |P u| for u = g / |g|: the length of the preconditioned unit vector."""
        return torch.sqrt(self.sq_norm_pg / self.sq_norm_g)


_CHUNK = 1 << 22


def _check_scale(value, dim: int, name: str):
    """sigma or bounds: a positive scalar or (D,) vector within ``SCALE_LIMITS``."""
    return check_positive_vector(value, dim, name, limits=SCALE_LIMITS, why=_SCALE_WHY)


def sum_of_squares(x: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """sum_i x_i^2 (times weights_i) in float64, in chunks: no float64 copy of a billion-entry anchor."""
    x = x.detach().reshape(-1)
    total = 0.0
    for lo in range(0, x.numel(), _CHUNK):
        piece = x[lo : lo + _CHUNK].double()
        piece = piece * piece
        if weights is not None:
            piece = piece * weights[lo : lo + _CHUNK].to(piece.device)
        total += float(piece.sum())
    return total


class GaussianMeasure:
    """N(0, diag(sigma^2)) about the origin: the initialization distribution, not centred at the anchor.

    Along theta0 + t w_hat the density is (2 pi)^(-D/2) prod(1/sigma_i) exp(-a t^2/2 + b t + c) with
    a = sum w_i^2 / sigma_i^2, b = -sum w_i theta0_i / sigma_i^2, c = -sum theta0_i^2 / (2 sigma_i^2).
    ``log_normalizer`` is log((2 pi)^(-D/2) prod(1/sigma_i)) and ``anchor_log_density_term`` is c.
    """

    name = "gaussian"
    is_box = False

    def __init__(self, anchor: torch.Tensor, sigma):
        self.dim = anchor.numel()
        self.sigma_scalar, self.sigma_vector = _check_scale(sigma, self.dim, "sigma")
        if self.sigma_scalar is not None:
            self.weights = None
            self._scale = 1.0 / self.sigma_scalar**2
            self.log_normalizer = -0.5 * self.dim * math.log(2 * math.pi) - self.dim * math.log(self.sigma_scalar)
            self.anchor_log_density_term = -0.5 * sum_of_squares(anchor) * self._scale
        else:
            self.weights = 1.0 / self.sigma_vector**2
            self._scale = 1.0
            self.log_normalizer = -0.5 * self.dim * math.log(2 * math.pi) - float(torch.log(self.sigma_vector).sum())
            self.anchor_log_density_term = -0.5 * sum_of_squares(anchor, self.weights)
        self.bounds = None

    def radial_coefficients(self, stats: DirectionStats) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the exponent -a t^2/2 + b t along each unit direction."""
        norm_pg = torch.sqrt(stats.sq_norm_pg)
        a = self._scale * stats.sq_norm_weighted / stats.sq_norm_pg
        b = -self._scale * stats.dot_anchor / norm_pg
        return a, b

    def radius_cap(self, stats: DirectionStats) -> torch.Tensor:
        """Radius beyond which the ray carries no measure worth searching for (float64 (B,))."""
        a, b = self.radial_coefficients(stats)
        n = max(self.dim - 1, 0)
        peak = (b + torch.sqrt(b * b + 4 * a * n)) / (2 * a)
        return peak.clamp_min(0) + _GAUSSIAN_TAIL_WIDTHS / torch.sqrt(a)

    def log_ray_measures(self, radii: torch.Tensor, stats: DirectionStats) -> torch.Tensor:
        """log of A_{D-1} * integral_0^r m(theta0 + t w_hat) t^(D-1) dt per direction."""
        a, b = self.radial_coefficients(stats)
        integral = log_radial_integral(float(self.dim - 1), a, b, radii.double())
        return log_sphere_area(self.dim) + self.log_normalizer + self.anchor_log_density_term + integral

    def describe(self) -> dict:
        sigma = self.sigma_scalar if self.sigma_scalar is not None else "per-parameter"
        info = {"name": self.name, "sigma": sigma}
        if self.sigma_vector is not None:
            info["sigma_rms"] = float(torch.sqrt((self.sigma_vector**2).mean()))
        return info


class UniformMeasure:
    """Lebesgue volume, or with ``bounds`` the normalized uniform prior on the box |theta_i| <= bounds_i.

    Lebesgue: A_{D-1} r^D / D = V_D r^D. Box: rays are clipped where they leave the box, and the log
    volume gains -sum log(2 bounds_i). An anchor outside the box has probability 0.
    """

    name = "uniform"

    def __init__(self, anchor: torch.Tensor, bounds=None, max_radius: float | None = None):
        self.dim = anchor.numel()
        self.weights = None
        self.is_box = bounds is not None
        self.outside_reason = None
        if self.is_box:
            x = anchor.detach().reshape(-1).double()
            scalar, vector = _check_scale(bounds, self.dim, "bounds")
            self.bounds = vector if vector is not None else torch.full((self.dim,), scalar, dtype=torch.float64)
            self.log_normalizer = -float(torch.log(2 * self.bounds).sum())
            outside = x.abs() > self.bounds
            if bool(outside.any()):
                k = int(outside.nonzero()[0])
                self.outside_reason = (
                    f"the anchor lies outside the box: parameter {k} is {float(x[k])!r} but its bound is "
                    f"{float(self.bounds[k])!r} ({int(outside.sum())} parameters outside), so the neighborhood "
                    "has probability 0 under the uniform prior; widen `bounds` to contain the anchor"
                )
        else:
            self.bounds = None
            self.log_normalizer = 0.0
        if max_radius is None:
            max_radius = _LEBESGUE_MAX_RADIUS_FACTOR * max(math.sqrt(sum_of_squares(anchor)), 1.0)
        self.max_radius = float(max_radius)

    def radius_cap(self, stats: DirectionStats) -> torch.Tensor:
        if self.is_box:
            return stats.box_exit_factor * torch.sqrt(stats.sq_norm_pg)
        return torch.full_like(stats.sq_norm_pg, self.max_radius)

    def log_ray_measures(self, radii: torch.Tensor, stats: DirectionStats) -> torch.Tensor:
        """log V_D r^D (+ the box normalizer), r clipped at the box; -inf for an anchor outside."""
        if self.outside_reason is not None:
            return torch.full_like(radii, -math.inf, dtype=torch.float64)
        r = radii.double()
        if self.is_box:
            r = torch.minimum(r, self.radius_cap(stats))
        return log_ball_volume(self.dim) + self.log_normalizer + self.dim * torch.log(r)

    def describe(self) -> dict:
        info = {"name": self.name, "box": self.is_box}
        if self.is_box:
            info["bounds_min"] = float(self.bounds.min())
            info["bounds_max"] = float(self.bounds.max())
        else:
            info["max_radius"] = self.max_radius
        return info


def check_measure(measure: str, dim: int, *, sigma=None, bounds=None) -> None:
    """The measure options of a run with ``dim`` parameters, checked without building the measure:
    what an entry point calls before any expensive work (``make_measure`` checks the same)."""
    _check_measure_pairing(measure, sigma, bounds)
    if measure == "gaussian" and sigma is not None:
        _check_scale(sigma, dim, "sigma")
    if measure == "uniform" and bounds is not None:
        _check_scale(bounds, dim, "bounds")


def _check_measure_pairing(measure: str, sigma, bounds) -> None:
    if not isinstance(measure, str) or measure not in ("gaussian", "uniform"):
        raise ValueError(f"measure must be 'gaussian' or 'uniform', got {measure!r}")
    if measure == "gaussian" and bounds is not None:
        raise ValueError("bounds apply to the uniform measure; pass measure='uniform' or drop bounds")
    if measure == "uniform" and sigma is not None:
        raise ValueError("sigma applies to the Gaussian measure; pass measure='gaussian' or drop sigma")


def make_measure(measure: str, anchor: torch.Tensor, *, sigma=None, bounds=None):
    """Build the measure named ``measure`` ("gaussian" or "uniform") for this anchor.

    sigma=None for the Gaussian means the RMS of the anchor's entries (the paper recommends the
    initialization scale instead; pass it when known).
    """
    _check_measure_pairing(measure, sigma, bounds)
    if measure == "gaussian":
        return GaussianMeasure(anchor, anchor_rms(anchor) if sigma is None else sigma)
    return UniformMeasure(anchor, bounds)


def anchor_rms(anchor: torch.Tensor) -> float:
    """The RMS of the anchor's entries: the Gaussian's sigma when none is given (an all-zero anchor is refused)."""
    sigma = math.sqrt(sum_of_squares(anchor) / anchor.numel())
    if not sigma > 0:
        raise ValueError("the anchor is all zeros, so sigma=None (its RMS) is 0; pass sigma explicitly")
    return sigma
