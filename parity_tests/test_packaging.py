"""The package as users meet it: docstring examples, no torch needed, typed."""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import pkgutil

import jax
import jax.numpy as jnp
import pytest

import jaxbn

from .helpers import run

PACKAGE = pathlib.Path(jaxbn.__file__).parent
# Every module and subpackage, at any depth (jaxbn.convert._convert included).
MODULES = sorted(["jaxbn", *(m.name for m in pkgutil.walk_packages(jaxbn.__path__, "jaxbn."))])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"jax": jax, "jnp": jnp, "jaxbn": jaxbn},
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0


def test_doctests_reach_every_module_file():
    """Nothing is skipped: one doctest run per .py file of the package, subpackages included."""
    files = {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    }
    assert set(MODULES) == files
    assert any(name.startswith("jaxbn.convert.") for name in MODULES)


def test_docstring_examples_exist():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples)
        for name in MODULES
        for test in finder.find(importlib.import_module(name))
    )
    assert examples >= 8


def imported_modules(path: pathlib.Path) -> set[str]:
    """Top-level names of everything ``path`` imports, however it is spelled."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("_functional.py", {"flax", "torch"}),
        ("_layers.py", {"flax", "torch"}),
        ("_linen.py", {"torch"}),
        ("_nnx.py", {"torch"}),
        # what a ported module runs on: no torch (the next steps run it without)
        ("port/_module.py", {"torch"}),
        ("port/_layers.py", {"torch"}),
        *(
            (f"port/ops/{path.name}", {"torch"})
            for path in sorted((PACKAGE / "port/ops").glob("*.py"))
        ),
    ],
)
def test_core_imports_neither_flax_nor_torch(module, forbidden):
    """The direction of dependency: the core is jax only, the modules and the ops a port
    runs never import torch."""
    assert not imported_modules(PACKAGE / module) & forbidden


def test_import_guard_sees_every_spelling(tmp_path):
    """The guard above can fail: each way of importing flax is caught."""
    for line in (
        "import flax",
        "import flax.linen as nn",
        "from flax import linen",
        "from flax.core import unfreeze",
        "importlib.import_module('flax')",
        "def f():\n    import flax",
    ):
        source = tmp_path / "m.py"
        source.write_text(line + "\n")
        assert "flax" in imported_modules(source), line


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
from jaxbn.port import ops
assert ops.max_pool2d(ops.relu(x), 3, 2, 1).shape == (2, 3, 2, 2)
assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok", y.shape)
"""
    result = run("python", "-c", code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok (2, 3, 4, 4)"


def test_jaxbn_port_is_the_call_and_the_packages_names_as_written():
    """`jaxbn.port(model, x)` ports; `jaxbn.port.PortError` (as the README says to catch
    it), `jaxbn.port.without_dropout`, `jaxbn.port.load` and `load_exported` are
    reachable from it, after `import jaxbn` or `import jaxbn.port`, and tracebacks name
    the error as users catch it."""
    code = """
import inspect, pickle, torch
import jaxbn.port
from jaxbn.port import PortError, load, load_exported, without_dropout
assert jaxbn.port.PortError is PortError and jaxbn.port.without_dropout is without_dropout
assert jaxbn.port.load is load and jaxbn.port.load_exported is load_exported
assert list(inspect.signature(jaxbn.port).parameters)[:2] == ["module", "example_input"]
ported = jaxbn.port(torch.nn.Sequential(torch.nn.ReLU()), torch.zeros(1, 2))
assert isinstance(ported, jaxbn.port.Ported)
try:
    jaxbn.port(torch.nn.Sequential(torch.nn.Tanhshrink()), torch.zeros(1, 2))
except jaxbn.port.PortError as error:
    assert pickle.loads(pickle.dumps(error)).args == error.args
    print(type(error).__module__ + "." + type(error).__name__)
"""
    result = run("python", "-c", code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jaxbn.port.PortError"


def test_typed_package():
    assert (PACKAGE / "py.typed").exists()


def test_readme_quickstart_runs():
    readme = (PACKAGE.parent / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(quickstart, "README.md quickstart", "exec"), namespace)
    assert int(namespace["batch_stats"]["BatchNorm_0"]["num_batches_tracked"]) == 1  # type: ignore[index]
    assert namespace["logits"].shape == (8, 10)  # type: ignore[attr-defined]
