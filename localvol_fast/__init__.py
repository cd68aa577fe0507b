"""localvol_fast: fast, dependable estimates of the local volume of trained neural networks.

The local volume of a network is the measure of the set of parameters around its trained weights
that behave like them (Scherlis & Belrose, "Estimating the Probability of Sampling a Trained Neural
Network at Random"); its negative log is the network's information content, in nats.
"""

from .measures import GaussianMeasure, UniformMeasure, make_measure
from .models import estimate, select_parameters
from .ops import available_backends
from .philox import gaussian_directions
from .preconditioners import adam_preconditioner, normalize_preconditioner
from .radial import log_ball_volume, log_radial_integral, log_sphere_area
from .result import VolumeResult, log_mean_exp
from .search import STATUS_NAMES, search_radii
from .volume import estimate_volume

__version__ = "0.1.0"

__all__ = [
    "GaussianMeasure",
    "UniformMeasure",
    "VolumeResult",
    "adam_preconditioner",
    "available_backends",
    "estimate",
    "estimate_volume",
    "gaussian_directions",
    "log_ball_volume",
    "log_mean_exp",
    "log_radial_integral",
    "log_sphere_area",
    "make_measure",
    "normalize_preconditioner",
    "search_radii",
    "select_parameters",
    "STATUS_NAMES",
]
