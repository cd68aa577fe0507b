"""``compare``: the difference of two models' log volumes on common random numbers, with a paired interval.

Both models are measured by ``estimate`` with the same options and seed, so the ray method sends both
along the same base directions u_i (a seeded function of (seed, i)) and the sequential method pairs
replicate k of one with replicate k of the other. The difference log V_a - log V_b (nats) then gets a
paired interval (``core.comparison``): tighter than two separate intervals wherever the two runs' errors
move together (checkpoints of one run, a clean and a poisoned network of one architecture).
"""

from __future__ import annotations

from localvol_fast.core.checks import is_cutoff_list
from localvol_fast.core.comparison import VolumeDifference, paired_ray_difference, paired_replicate_difference
from localvol_fast.nn.estimator import estimate


def compare(model_a, model_b, data, *, data_b=None, optimizer_a=None, optimizer_b=None, **options) -> VolumeDifference:
    """log V(model_a) - log V(model_b) with its paired 95% interval.

    data: the evaluation data of both (or of model_a, with data_b for model_b). optimizer_a/optimizer_b:
    each model's own optimizer for preconditioner="adam". Every other option is ``estimate``'s, the same
    for both (one cutoff; method "rays" or "sequential"). ``.difference``, ``.interval`` and
    ``.excludes_zero`` hold the answer; ``.log_volume_a`` / ``.log_volume_b`` the two volumes.
    """
    if "optimizer" in options:
        raise ValueError("compare takes optimizer_a= and optimizer_b= (each model's own), not optimizer=")
    if is_cutoff_list(options.get("cutoff", 1e-2)):
        raise ValueError(f"compare takes one cutoff, got {options['cutoff']!r}; call it once per cutoff")
    a = estimate(model_a, data, optimizer=optimizer_a, **options)
    b = estimate(model_b, data if data_b is None else data_b, optimizer=optimizer_b, **options)
    if options.get("method", "rays") == "rays":
        return paired_ray_difference(a, b)
    return paired_replicate_difference(
        a.replicate_log_volumes[0], b.replicate_log_volumes[0], log_volume_a=a.log_volume, log_volume_b=b.log_volume,
        method="sequential (paired replicates)",
    )
