"""The comparison primitive: how far a jaxbn value is from torch's, and why it fails."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Measured against torch 2.13 (CPU) on ordinary inputs: float32 outputs agree
# to ~5e-7 and gradients to ~1e-6; 1e-5 leaves a wide margin.
TOLERANCES = {
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    "float64": {"rtol": 1e-10, "atol": 1e-10},
}


def compare(actual: Any, desired: Any, *, rtol: float, atol: float) -> tuple[float, str]:
    """Max |actual - desired| and, if beyond ``atol + rtol * |desired|``, why.

    Integers must match exactly; NaN and inf must sit in the same places.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    if actual.shape != desired.shape:
        return math.inf, f"shape {actual.shape} != torch's {desired.shape}"
    if np.issubdtype(desired.dtype, np.integer):
        rtol = atol = 0.0
    elif actual.dtype != desired.dtype:
        return math.inf, f"dtype {actual.dtype} != torch's {desired.dtype}"
    a, d = actual.astype(np.float64), desired.astype(np.float64)
    same = (a == d) | (np.isnan(a) & np.isnan(d))
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.nan_to_num(np.abs(a - d), nan=math.inf))
        bad = ~same & (~(err <= atol + rtol * np.abs(d)) | np.isinf(a) | np.isinf(d))
    if err.size == 0:
        return 0.0, ""
    if not bad.any():
        return float(err.max()), ""
    index = np.unravel_index(np.argmax(np.where(bad, err, -1.0)), err.shape)
    return float(err.max()), (
        f"{int(bad.sum())} of {bad.size} beyond atol={atol}, rtol={rtol} "
        f"(dtype {actual.dtype}); worst at {tuple(int(i) for i in index)}: "
        f"jaxbn {a[index]!r} vs torch {d[index]!r}"
    )
