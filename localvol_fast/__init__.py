"""localvol_fast: fast, dependable estimates of the local volume of trained neural networks.

The local volume of a network is the measure of the set of parameters around its trained weights
that behave like them (Scherlis & Belrose, "Estimating the Probability of Sampling a Trained Neural
Network at Random"); its negative log is the network's information content, in nats.
"""

from localvol_fast.core import ground_truth
from localvol_fast.core.comparison import VolumeDifference
from localvol_fast.core.measures import GaussianMeasure, UniformMeasure, make_measure
from localvol_fast.core.philox import gaussian_directions
from localvol_fast.core.preconditioners import normalize_preconditioner
from localvol_fast.core.radial import log_ball_volume, log_radial_integral, log_sphere_area
from localvol_fast.core.result import VolumeResult, log_mean_exp
from localvol_fast.core.search import STATUS_NAMES, search_radii
from localvol_fast.engine.estimator import estimate_volume
from localvol_fast.engine.sequential import sequential_volume
from localvol_fast.engine.sequential_result import SequentialResult
from localvol_fast.nn.compare import compare
from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.parameters import select_parameters
from localvol_fast.nn.preconditioners import adam_preconditioner
from localvol_fast.ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "GaussianMeasure",
    "SequentialResult",
    "UniformMeasure",
    "VolumeDifference",
    "VolumeResult",
    "adam_preconditioner",
    "available_backends",
    "compare",
    "estimate",
    "estimate_volume",
    "gaussian_directions",
    "ground_truth",
    "log_ball_volume",
    "log_mean_exp",
    "log_radial_integral",
    "log_sphere_area",
    "make_measure",
    "normalize_preconditioner",
    "search_radii",
    "select_parameters",
    "sequential_volume",
    "STATUS_NAMES",
]
