"""Session configuration: eight CPU devices, strict dtype promotion, deterministic torch.

Shared helpers live in :mod:`parity_tests.helpers`; tests import them from
there.
"""

from __future__ import annotations

import os

# Eight CPU devices for the cross-device tests; must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Each pytest-xdist worker (and the scripts it runs) gets its share of the
# cores for torch's OpenMP threads: two workers with a thread per core each
# ran the ported-model tests 12% slower on 2 cores. Must precede importing
# torch.
os.environ.setdefault(
    "OMP_NUM_THREADS",
    str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))),
)

import jax
import pytest
import torch

jax.config.update("jax_numpy_dtype_promotion", "strict")
torch.use_deterministic_algorithms(True)


@pytest.fixture
def x64():
    """Enable jax_enable_x64 for one test."""
    with jax.enable_x64(True):
        yield
