"""The porting journey of docs/cli.md, as a user on a fresh clone takes it.

After the README's set-up and its port extra (``.ci/run`` runs both): a training
script's 10-class checkpoint, ``jaxbn port`` with the factory's argument and the
checkpoint (a process of its own, as from the shell), the saved port fine-tuned in
JAX, and the result back in the torch model with ``strict=True``.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import sys

import jax
import numpy as np
import pytest
import torch

from .helpers import ROOT, assert_sample_matches, readme_sample, run

GUIDE = ROOT / "docs/cli.md"
SECTION = "### From a checkpoint to training in JAX, and back"


def _blocks(kind: str) -> list[str]:
    text = GUIDE.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{kind}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_a_checkpoint_ported_from_the_shell_fine_tuned_and_back_in_torch(tmp_path, monkeypatch):
    (make_checkpoint,) = _blocks("bash")
    python, code = shlex.split(make_checkpoint)[0], shlex.split(make_checkpoint)[-1]
    assert python == "python"
    assert run(sys.executable, "-c", code, cwd=tmp_path, timeout=300).returncode == 0

    sample = [line for line in GUIDE.read_text().splitlines() if line.startswith("$ jaxbn port")]
    command = next(line for line in sample if "--checkpoint" in line).removeprefix("$ ")
    jaxbn_command = pathlib.Path(sys.executable).with_name("jaxbn")
    done = run(jaxbn_command, *shlex.split(command)[1:], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr
    assert_sample_matches(readme_sample(command, "docs/cli.md"), done.stdout.splitlines())

    (fine_tune,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(fine_tune, f"{GUIDE.name}, the fine-tuning block", "exec"), namespace)
    ported, model = namespace["ported"], namespace["model"]
    variables = {"params": namespace["params"], "batch_stats": namespace["batch_stats"]}
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 3  # type: ignore[index]
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    expected = ported.module.apply(variables, x, train=False)  # type: ignore[attr-defined]
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()  # type: ignore[attr-defined]
    scale = float(np.max(np.abs(np.asarray(expected))))
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5 * scale, rtol=0)
    moved = jax.tree.leaves(variables["params"])
    saved = jax.tree.leaves(jax.tree.map(np.asarray, ported.variables["params"]))  # type: ignore[attr-defined]
    assert any(not np.array_equal(a, b) for a, b in zip(moved, saved, strict=True))
