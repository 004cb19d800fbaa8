"""What the tests share: the comparison helpers, the example loader, one subprocess runner.

Tests import these from here, never from ``conftest`` or from another test
module; ``conftest`` only configures the session.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Collection, Mapping
from types import ModuleType
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxbn import cli, parity
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


def fast_lane(*values: Any, keep: int | Collection[Any] = 1) -> list[Any]:
    """Parametrize ``values`` with all but the first ``keep`` (or those in ``keep``) marked slow.

    The fast lane (``-m "not slow"``) runs one case of a parametrized test;
    CI runs them all. A value for several argument names is a ``pytest.param``.
    """

    def slow(value: Any) -> Any:
        if isinstance(value, pytest.ParameterSet):
            return pytest.param(*value.values, marks=[*value.marks, pytest.mark.slow], id=value.id)
        return pytest.param(value, marks=pytest.mark.slow)

    def fast(i: int, value: Any) -> bool:
        return i < keep if isinstance(keep, int) else value in keep

    return [value if fast(i, value) else slow(value) for i, value in enumerate(values)]


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


def jaxbn_here(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``jaxbn ARGV`` in this process: (exit code, stdout, stderr); never a traceback.

    The same code as the command, without a fresh process's 5 s of importing
    jax and torch; tests of the process itself (entry point, closed pipes)
    use :func:`run_jaxbn`.
    """
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


# --- the printed samples of the README and the guides ----------------------------

NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def doc_files() -> list[pathlib.Path]:
    """README.md, the guides in docs/, benchmarks/README.md and CONTRIBUTING.md."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks/README.md",
        ROOT / "CONTRIBUTING.md",
    ]


def readme_sample(command: str, doc: str | None = None) -> list[str]:
    """The lines a doc prints under ``$ {command}`` (its output sample).

    ``doc`` is the file's path from the repository root (``"docs/cli.md"``);
    without it, the one file of :func:`doc_files` that shows the sample.
    """
    prompt = f"$ {command}\n"
    if doc is None:
        shown = [path for path in doc_files() if prompt in path.read_text()]
        assert len(shown) == 1, f"{prompt!r} is shown in {len(shown)} files: {shown}"
        (path,) = shown
    else:
        path = ROOT / doc
    text = path.read_text()
    start = text.index(prompt) + len(prompt)
    return text[start : text.index("```", start)].rstrip("\n").splitlines()


def assert_sample_matches(sample: list[str], output: list[str]) -> None:
    """Each sample line is a line of ``output``, in order.

    A sample line ``...`` skips output lines; ``...`` inside a line stands
    for any text. The words must be the same (spacing and rules of dashes
    may differ in width); numbers printed in e-notation (differences)
    within a factor 10 of the sample's, or both at most 1e-6 (float32
    roundoff); other numbers within 0.1% of the sample's. A sample from
    another run on another machine still matches; a stale one does not.
    """
    at = 0
    skipping = False
    for line in sample:
        if line.strip() == "...":
            skipping = True
            continue
        parts = [re.escape(part) for part in re.split(NUMBER, line.strip())]
        # re.split keeps the numbers at the odd positions.
        pattern = "".join(NUMBER if i % 2 else part for i, part in enumerate(parts))
        pattern = pattern.replace(re.escape("..."), ".*")
        # Column widths depend on the rows shown: any run of spaces, any rule of dashes.
        pattern = re.sub(r"(?:\\ )+", lambda _: r"\s+", pattern)
        pattern = re.sub(r"(?:\\-){2,}", lambda _: "-+", pattern)
        failure = "the output ended"
        while at < len(output):
            match = re.fullmatch(pattern, output[at].strip())
            failure = (
                _numbers_differ(re.findall(NUMBER, line.strip()), match.groups())
                if match
                else "different words"
            )
            if not failure:
                break
            assert skipping, f"README {line!r}\n   run {output[at]!r}: {failure}"
            at += 1
        assert at < len(output), f"README line {line!r} not in the run ({failure}):\n" + "\n".join(
            output
        )
        at += 1
        skipping = False


def _numbers_differ(wanted: list[str], got: tuple[str, ...]) -> str:
    for want, have in zip(wanted, got, strict=True):
        w, g = float(want), float(have)
        if "e" in want:  # a difference: the same order of magnitude, or both at roundoff
            ok = max(w, g) <= 1e-6 or (w > 0 and g > 0 and 0.1 <= g / w <= 10)
        else:
            ok = abs(g - w) <= 1e-3 * max(abs(w), 1)
        if not ok:
            return f"README {want} vs run {have}"
    return ""


def bits(value: Any) -> np.ndarray:
    """The raw bytes of an array or tensor, for bit-exact comparison."""
    array = to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
    return np.ascontiguousarray(array).view(np.uint8)


def assert_same_state(actual: dict[str, torch.Tensor], desired: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(desired)
    for key, tensor in desired.items():
        assert actual[key].dtype == tensor.dtype, key
        assert actual[key].shape == tensor.shape, key
        # np.array_equal: np.testing's assertion took 10 s on vgg11_bn's 133M values
        have, want = bits(actual[key]), bits(tensor)
        if not np.array_equal(have, want):
            raise AssertionError(
                f"{key}: {np.count_nonzero(have != want)} of {want.size} bytes differ"
            )


def reference_batch_norm(x, scale, bias, axis, eps=1e-5):
    """Textbook two-pass BatchNorm in plain jnp, differentiated by autodiff."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = tuple(x.shape[i] if i == axis else 1 for i in range(x.ndim))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
