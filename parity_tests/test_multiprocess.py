"""Data parallelism across processes: 2 processes x 4 CPU devices on loopback.

Runs ``examples/multi_process.py``: ``jax.distributed`` with CPU collectives,
one 8-device mesh, each process feeding its part of the global batch; 3
training steps and an eval step of a small CNN with synchronised jaxbn
layers, under ``shard_map`` (``axis_name``) and plain ``jit``, against
``torch.nn.BatchNorm2d`` in the same CNN on the concatenated global batch.
"""

from __future__ import annotations

import time

import pytest

from .helpers import load_example as load

QUANTITIES = {"outputs", "gradients", "weights", "running statistics", "eval outputs"}


@pytest.mark.slow  # the fast lane has one process's devices (test_scale_out)
def test_two_processes_match_torch_on_the_global_batch():
    results = load("multi_process").launch(2, 4, timeout=400, verbose=False)
    assert [r["process"] for r in results] == [0, 1]
    for result in results:
        assert result["devices"] == 8
        assert result["counter"] == 3
        assert set(result["worst"]) == {"shard_map", "jit"}
        for variant, worst in result["worst"].items():
            assert set(worst) == QUANTITIES, variant
            for quantity, diff in worst.items():
                # Measured: at most 3e-7 against float64 torch.
                assert diff < 1e-5, f"process {result['process']} {variant} {quantity}: {diff}"
    # Both processes see the same global results.
    assert results[0]["worst"] == results[1]["worst"]


def test_workers_are_stopped_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="still running after 1 s, stopped"):
        load("multi_process").launch(2, 4, timeout=1.0, verbose=False)
    assert time.monotonic() - start < 60


def test_gloo_connection_lines_are_left_out_of_the_output():
    """jaxlib's gloo prints one line per device as it connects; two may interleave."""
    gloo = "[Gloo] Rank {} is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
    worker = "process 1 of 2: 4 of 8 devices, global batch 32\nstep 1 (train): jit 1.4e-07\n"
    first, second = worker.splitlines(keepends=True)
    interleaved = gloo.format(7).replace("7 peer", gloo.format(6) + "7 peer", 1)
    text = first + gloo.format(4) + interleaved + second
    assert load("multi_process").without_gloo_chatter(text) == worker
