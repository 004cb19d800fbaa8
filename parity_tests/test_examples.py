"""The runnable examples, at a small size."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look themselves up here
    spec.loader.exec_module(module)
    return module


def test_train_cnn_learns_and_counts_steps():
    result = load("train_cnn").main(steps=20)
    assert result["num_batches_tracked"] == 20
    assert math.isfinite(result["last_loss"])
    assert result["last_loss"] < result["first_loss"]


def test_data_parallel_statistics_equal_a_single_device_run():
    worst = load("data_parallel").main(steps=3, verbose=False)
    assert worst["batch_stats"] < 1e-5
    assert worst["params"] < 1e-5
    assert worst["loss"] < 1e-5
