"""What the tests share: the comparison helpers, the example loader, one subprocess runner.

Tests import these from here, never from ``conftest`` or from another test
module; ``conftest`` only configures the session.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch

from jaxbn import parity
from jaxbn.parity import TOLERANCES, Case, Kind, Options, Step, compare, step_quantities, to_numpy

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

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


def run_case(kind: Kind, options: Options, *, jit: bool) -> None:
    """10 training steps then 3 eval steps; every quantity compared after each."""
    result = parity.run_case(Case(kind, options, jit=jit))
    assert result.passed, "\n".join(result.failures)
    assert result.max_abs_diff, "nothing was compared"


def load_example(name: str) -> ModuleType:
    """``examples/{name}.py`` as a module, imported in this process."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look themselves up here
    spec.loader.exec_module(module)
    return module


def run(
    *command: str | os.PathLike[str],
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` in a fresh process, as a user's shell runs it: text output, never raises.

    ``python`` as the first word means this interpreter; ``env`` is added to
    this process's environment.
    """
    argv = [
        sys.executable if str(c) == "python" and i == 0 else str(c) for i, c in enumerate(command)
    ]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )


def run_jaxbn(
    *args: str | os.PathLike[str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The ``jaxbn`` command (``python -m jaxbn.cli``) in a fresh process."""
    return run("python", "-m", "jaxbn.cli", *args, timeout=timeout)
