"""The ``jaxbn parity`` command and the comparison it rests on."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from jaxbn import cli, parity


def test_parity_command_passes_on_all_builtin_cases(tmp_path):
    """The project's main job, as a user runs it."""
    report = tmp_path / "parity.json"
    result = subprocess.run(
        [sys.executable, "-m", "jaxbn.cli", "parity", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = len(parity.builtin_cases())
    assert f"{cases} of {cases} cases passed." in result.stdout
    assert "2d/no-affine/momentum=None/float32/jit" in result.stdout
    assert f"[{cases}/{cases}] ok" in result.stderr  # progress display
    saved = json.loads(report.read_text())
    assert saved["environment"]["torch"].startswith("2.")
    assert len(saved["results"]) == cases
    assert all(r["passed"] for r in saved["results"])
    assert set(saved["results"][0]["max_abs_diff"]) == set(parity.QUANTITIES)


def test_parity_command_fails_loudly_on_a_mismatch(monkeypatch, capsys, tmp_path):
    """A deliberate mismatch: torch keeps a Flax-convention momentum, jaxbn does not."""
    make_pair = parity.make_pair

    def flax_momentum_on_torch_side(kind, options, seed=0):
        ref: Any
        ref, ans, variables = make_pair(kind, options, seed)
        ref.momentum = 0.99
        return ref, ans, variables

    monkeypatch.setattr(parity._cases, "make_pair", flax_momentum_on_torch_side)
    code = cli.main(
        ["parity", "-k", "2d/affine/momentum=0.1/float32/jit", "--json", str(tmp_path / "r.json")]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "0 of 1 cases passed." in out
    assert "FAIL 2d/affine/momentum=0.1/float32/jit: train step 0 mean" in out
    assert not json.loads((tmp_path / "r.json").read_text())["results"][0]["passed"]


def test_parity_command_lists_and_filters(capsys):
    assert cli.main(["parity", "--list", "-k", "3d/"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed
    assert all(name.startswith("3d/") for name in listed)
    assert cli.main(["parity", "-k", "no such case"]) == 2


@pytest.mark.parametrize(
    ("actual", "desired", "message"),
    [
        (
            np.array([1, 2], np.float32),
            np.array([1, 2.001], np.float32),
            r"1 of 2 beyond .* worst at \(1,\)",
        ),
        (np.array([np.nan], np.float32), np.array([1], np.float32), "1 of 1 beyond"),
        (np.array([1], np.float32), np.array([np.nan], np.float32), "1 of 1 beyond"),
        (np.array([np.inf], np.float32), np.array([-np.inf], np.float32), "1 of 1 beyond"),
        (np.array([1, 2], np.float32), np.array([1], np.float32), "shape"),
        (np.array([1], np.float64), np.array([1], np.float32), "dtype float64 != torch's float32"),
        (np.int32(4), np.int64(5), "1 of 1 beyond"),
    ],
)
def test_compare_flags_every_kind_of_difference(actual, desired, message):
    _, failure = parity.compare(actual, desired, rtol=1e-5, atol=1e-5)
    assert failure
    assert re.search(message, failure)


def test_compare_accepts_matching_values():
    values = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    assert parity.compare(values, values.copy(), rtol=0, atol=0) == (0.0, "")
    diff, failure = parity.compare(
        np.array([1 + 1e-6], np.float32), np.array([1], np.float32), rtol=1e-5, atol=1e-5
    )
    assert not failure
    assert math.isclose(diff, 1e-6, rel_tol=0.2)
