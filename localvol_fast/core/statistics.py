"""Small statistics shared by every interval: Student's t quantiles."""

from __future__ import annotations

import torch

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)


def t_quantile(level: float, dof: int) -> float:
    """The (1 + level)/2 quantile of Student's t with ``dof`` degrees of freedom: exact (4 digits) for
    level 0.95 and dof <= 10, else the Cornish-Fisher expansion z + (z^3 + z)/(4 dof)
    + (5 z^5 + 16 z^3 + 3 z)/(96 dof^2) (within 1% from dof = 3 on)."""
    if dof < 1:
        raise ValueError(f"a t quantile needs degrees of freedom >= 1, got {dof!r} (an interval needs two values or more)")
    if level == 0.95 and dof <= len(_T975):
        return _T975[dof - 1]
    z = float(torch.special.ndtri(torch.tensor((1.0 + level) / 2.0, dtype=torch.float64)))
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
