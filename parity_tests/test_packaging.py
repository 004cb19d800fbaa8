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


def test_readme_quickstart_runs_and_prints_what_it_shows(capsys):
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    quickstart = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("It prints:\n\n```\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(quickstart, "README.md quickstart", "exec"), namespace)
    assert int(namespace["batch_stats"]["BatchNorm_0"]["num_batches_tracked"]) == 1  # type: ignore[index]
    assert namespace["logits"].shape == (8, 10)  # type: ignore[attr-defined]
    assert capsys.readouterr().out == shown


# --- the package's own import structure --------------------------------------
# Rooms, lowest first: each imports only rooms before it. The root `jaxbn`
# re-exports and is imported by none. The core is the pure functions (jax only);
# the modules are the Flax layers on it; convert, port, parity and cli are packages.
ROOMS = ("core", "modules", "convert", "port", "parity", "cli")
TOP_LEVEL = {
    "jaxbn._functional": "core",
    "jaxbn._layers": "core",
    "jaxbn._version": "core",
    "jaxbn._torch": "core",  # (tensors <-> arrays; torch imported when called)
    "jaxbn._linen": "modules",
    "jaxbn._nnx": "modules",
    "jaxbn._frozen": "modules",
    "jaxbn.nnx": "modules",
    "jaxbn._bench": "modules",  # (times the modules; jaxbn bench runs it)
}
FILES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}


def jaxbn_imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The jaxbn modules that module ``name`` (its file ``path``) imports, at any scope,
    relative or absolute: ``from .. import _linen`` is jaxbn._linen, ``from . import x``
    in a package's __init__ is that package's x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.level:
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                for a in node.names
            ]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def room(name: str) -> str:
    part = name.split(".")[1] if "." in name else "jaxbn"
    if part in ROOMS or part == "jaxbn":
        return part
    assert name in TOP_LEVEL, f"{name}: a new module: give it a room in TOP_LEVEL"
    return TOP_LEVEL[name]


GRAPH = {name: jaxbn_imports(name, path, set(FILES)) for name, path in FILES.items()}


def test_rooms_import_downwards_only_and_nothing_imports_the_root():
    """core <- convert <- port <- parity <- cli: the library never imports its command
    line, and no module imports the package root (which imports them)."""
    wrong = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if name != "jaxbn"
        and (room(target) == "jaxbn" or ROOMS.index(room(target)) > ROOMS.index(room(name)))
    ]
    assert not wrong


def test_the_package_has_no_import_cycles():
    """No module reaches itself through its imports, function-local ones included."""
    cycles = []
    for start in GRAPH:
        seen, todo = set(), list(GRAPH[start])
        while todo:
            module = todo.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(GRAPH[module])
    assert not cycles


def test_the_import_graph_sees_relative_and_local_imports(tmp_path):
    """The guards above can fail: each spelling resolves to the module it names."""
    modules = {"jaxbn", "jaxbn._linen", "jaxbn.port", "jaxbn.port._a", "jaxbn.cli"}
    source = tmp_path / "_a.py"
    for line, target in (
        ("from .. import _linen", "jaxbn._linen"),
        ("from .._linen import BatchNorm", "jaxbn._linen"),
        ("from .. import port", "jaxbn.port"),
        ("from .. import __version__", "jaxbn"),
        ("import jaxbn", "jaxbn"),
        ("def f():\n    from ..cli import main", "jaxbn.cli"),
        ("from jaxbn.cli import main", "jaxbn.cli"),
    ):
        source.write_text(line + "\n")
        assert jaxbn_imports("jaxbn.port._a", source, modules) == {target}, line


def test_the_jaxbn_names_a_ports_source_spells_are_public():
    """Generated source calls jaxbn.<name>: each is the package's own, in __all__."""
    from jaxbn.port._source import _JAXBN_NAMES

    for value in _JAXBN_NAMES:
        assert value.__name__ in jaxbn.__all__
        assert getattr(jaxbn, value.__name__) is value
