"""Test configuration and the one comparison helper.

The reference/answer plumbing (building twin layers, stepping torch and
jaxbn) lives in :mod:`jaxbn.parity`, which ``jaxbn parity`` also runs; the
tests here assert on every step it produces.
"""

from __future__ import annotations

import os

# Eight CPU devices for the cross-device tests; must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import pytest
import torch

from jaxbn.parity import TOLERANCES, Kind, Step, compare, step_quantities, to_numpy

jax.config.update("jax_numpy_dtype_promotion", "strict")
torch.use_deterministic_algorithms(True)

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def assert_close(actual: Any, desired: Any, *, what: str = "", **tolerance: float) -> None:
    """``actual`` (jaxbn) against ``desired`` (torch), per-dtype tolerances.

    On failure, the message gives both dtypes and the worst element.
    """
    if isinstance(desired, torch.Tensor):
        desired = to_numpy(desired)
    desired = np.asarray(desired)
    default = TOLERANCES.get(str(desired.dtype), {"rtol": 0.0, "atol": 0.0})
    _, failure = compare(actual, desired, **(default | tolerance))
    assert not failure, f"{what}: {failure}"


def compare_steps(ans: Step, ref: Step, kind: Kind, *, what: str, **tolerance: float) -> None:
    """Every output, gradient and running statistic of one step."""
    quantities: Mapping[str, tuple[Any, Any]] = step_quantities(ans, ref, kind)
    for name, (actual, desired) in quantities.items():
        assert_close(actual, desired, what=f"{what} {name}", **tolerance)


@pytest.fixture
def x64():
    """Enable jax_enable_x64 for one test."""
    with jax.enable_x64(True):
        yield
