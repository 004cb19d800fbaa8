"""The package as users meet it: docstring examples, no torch needed, typed."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxbn

PACKAGE = pathlib.Path(jaxbn.__file__).parent
MODULES = sorted(f"jaxbn.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"jax": jax, "jnp": jnp, "jaxbn": jaxbn},
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0


def test_docstring_examples_exist():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples)
        for name in MODULES
        for test in finder.find(importlib.import_module(name))
    )
    assert examples >= 8


def test_core_and_modules_work_without_torch():
    """torch is an optional extra: block it and use the core and a module."""
    code = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import jax, jax.numpy as jnp
import jaxbn
layer = jaxbn.BatchNorm2d(3)
x = jnp.ones((2, 3, 4, 4))
variables = layer.init(jax.random.key(0), x, use_running_average=False)
y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok", y.shape)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok (2, 3, 4, 4)"


def test_core_imports_neither_flax_nor_torch():
    source = (PACKAGE / "_functional.py").read_text()
    assert "import flax" not in source
    assert "import torch" not in source
    linen = (PACKAGE / "_linen.py").read_text()
    assert "import torch" not in linen


def test_typed_package():
    assert (PACKAGE / "py.typed").exists()


def test_readme_quickstart_runs():
    readme = (PACKAGE.parent / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(quickstart, "README.md quickstart", "exec"), namespace)
    assert int(namespace["batch_stats"]["BatchNorm_0"]["num_batches_tracked"]) == 1  # type: ignore[index]
    assert namespace["logits"].shape == (8, 10)  # type: ignore[attr-defined]
