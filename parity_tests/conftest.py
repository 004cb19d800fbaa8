"""Session set-up: eight CPU devices, strict dtype promotion, deterministic torch, compile cache.

Shared helpers live in :mod:`parity_tests.helpers`; tests import them from
there.
"""

from __future__ import annotations

import os

# Eight CPU devices for the cross-device tests; must precede jax's first use.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Each pytest-xdist worker (and the scripts it runs) gets its share of the
# cores for torch's OpenMP threads. Only in the workers: a value set in the
# controller would reach them in its environment. Must precede importing torch.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))),
    )

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Strict dtype promotion and a compile cache in jax, deterministic torch, where tests run.

    Not in a pytest-xdist controller, which runs no tests: importing jax and
    torch there delayed the workers' start by 7 s.
    """
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import jax
    import torch

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    if cache is not None:
        # Most of the suite's time is XLA compiling: a rerun takes compiled
        # programs from .pytest_cache (`pytest --cache-clear` empties it),
        # and the two workers share them. (With a size limit, jax locks and
        # scans the folder on every write: the fast lane took 5 min, not 2.)
        jax.config.update("jax_compilation_cache_dir", str(cache.mkdir("jax")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    torch.use_deterministic_algorithms(True)


# The modules whose tests compile whole models (15-90 s each, half the
# suite's time) run first, and pyproject's --dist=worksteal lets an idle
# worker take the other's last tests: in name order under xdist's default
# scheduling, densenet121 (90 s) started 13 minutes in and left the other
# worker idle for 78 s. (Heavy-first alone is worse: the default hands each
# worker a contiguous chunk, so one of them got every model.)
HEAVY_FIRST = ("test_port_models.py", "test_examples.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in HEAVY_FIRST)  # stable: else as collected


@pytest.fixture
def x64():
    """Enable jax_enable_x64 for one test."""
    import jax

    with jax.enable_x64(True):
        yield
