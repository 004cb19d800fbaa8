"""Session configuration: eight CPU devices, strict dtype promotion, deterministic torch.

Shared helpers live in :mod:`parity_tests.helpers`; tests import them from
there.
"""

from __future__ import annotations

import os
from importlib.metadata import version

# Eight CPU devices for the cross-device tests. And most of the suite's time
# is XLA compiling (each ported model's harness: 15-60 s): on jaxlib 0.10, the
# series the `test` extra pins, XLA:CPU's legacy loop emitters
# (--xla_cpu_use_fusion_emitters=false) compile it about 20% faster (three
# ported models: 154 -> 126 s). Both are XLA's own code generators for the
# same HLO; only the rounding of fused float32 elementwise code may differ,
# and every tolerance holds either way. `jaxbn parity`, the main job, runs
# with XLA's defaults. Flags already in XLA_FLAGS win. Must precede jax's
# first use of its backend.
xla_flags = ["--xla_force_host_platform_device_count=8"]
if version("jaxlib").split(".")[:2] == ["0", "10"]:
    xla_flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f for f in xla_flags if f.partition("=")[0] not in os.environ.get("XLA_FLAGS", "")]
).strip()
# Each pytest-xdist worker (and the scripts it runs) gets its share of the
# cores for torch's OpenMP threads: two workers with a thread per core each
# ran the ported-model tests 12% slower on 2 cores. Must precede importing
# torch.
os.environ.setdefault(
    "OMP_NUM_THREADS",
    str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))),
)

import pytest  # noqa: E402 (after the environment above)


def pytest_configure(config: pytest.Config) -> None:
    """Strict dtype promotion in jax, deterministic algorithms in torch, where tests run.

    Not in a pytest-xdist controller, which runs no tests: importing jax and
    torch there delayed the workers' start by 7 s.
    """
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import jax
    import torch

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    torch.use_deterministic_algorithms(True)


@pytest.fixture
def x64():
    """Enable jax_enable_x64 for one test."""
    import jax

    with jax.enable_x64(True):
        yield
