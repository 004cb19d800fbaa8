"""A port saved as a directory the user owns, and loaded where torch is not installed.

``ported.save(directory)`` writes three files:

- ``model.py``: the generated Flax source (:meth:`Ported.source`);
- ``variables.msgpack``: both collections, Flax's msgpack (every bit kept);
- ``port.json``: the versions it was ported with, the torch class, the
  example input's shape and dtype, the ops it calls and its frozen parameters.

:func:`jaxbn.port.load` imports ``model.py`` and reads the variables back: it needs jax,
flax, numpy and jaxbn, not torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from .._version import __version__
from ..convert import load_variables, save_variables
from ._errors import PortError

FORMAT = 1  # what port.json, model.py and variables.msgpack hold; a change refuses old ones
FILES = ("model.py", "variables.msgpack", "port.json")


def _version() -> str:
    return __version__


def compatible(saved: str, running: str) -> bool:
    """Whether a port saved by jaxbn ``saved`` loads in jaxbn ``running``: the same
    major and minor version (the generated code calls jaxbn's public names)."""
    return saved.split(".")[:2] == running.split(".")[:2]


def check_directory(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as a Path a port can be written to, or PortError saying why not."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise PortError(f"jaxbn.port: {path} is a file; save a port to a directory")
    parent = path.parent if not path.exists() else path
    if not parent.is_dir():
        raise PortError(
            f"jaxbn.port: cannot write {path}: its parent directory {parent} does not "
            f"exist (create it: mkdir -p {parent})"
        )
    if not os.access(parent, os.W_OK):
        raise PortError(f"jaxbn.port: cannot write {path}: {parent} is not writable")
    return path


def save(ported: Any, path: Path, source: str) -> Path:
    """Write ``ported`` (with its generated ``source``) to ``path``, which
    :func:`check_directory` returned."""
    path.mkdir(exist_ok=True)
    meta = {
        "format": FORMAT,
        "class": _root_class(source),
        **{key: value for key, value in ported.info.items()},
        "jaxbn": _version(),
        "ops": list(ported.ops),
        "frozen": [list(key) for key in ported.frozen],
    }
    (path / "model.py").write_text(source)
    save_variables(path / "variables.msgpack", ported.variables)
    (path / "port.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _root_class(source: str) -> str:
    """The generated module's last class: the model (its parts come first)."""
    names = [line[6:].split("(")[0] for line in source.splitlines() if line.startswith("class ")]
    return names[-1]


def read(directory: str | os.PathLike[str]) -> tuple[Any, ...]:
    """A saved port's fields: (module, variables, ops, frozen, info); see
    :func:`jaxbn.port.load`, which makes them a :class:`jaxbn.port.Ported`."""
    path = Path(directory)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise PortError(
            f"jaxbn.port.load: {path} is not a saved port (no {', '.join(missing)}); "
            "write one with ported.save(directory) or jaxbn port ... -o DIRECTORY"
        )
    try:
        meta = json.loads((path / "port.json").read_text())
    except ValueError as error:
        raise PortError(f"jaxbn.port.load: {path / 'port.json'} is not JSON: {error}") from None
    saved, running = str(meta.get("jaxbn", "unknown")), _version()
    if meta.get("format") != FORMAT or not compatible(saved, running):
        raise PortError(
            f"jaxbn.port.load: {path} was written by jaxbn {saved} (save format "
            f"{meta.get('format')}); this is jaxbn {running} (format {FORMAT}), whose "
            f"layers its model.py may not match. Load it with jaxbn=={saved}, or port the "
            "torch model again and save it with this jaxbn"
        )
    module = _import(path / "model.py")
    cls = getattr(module, str(meta.get("class")), None)
    if cls is None:
        raise PortError(
            f"jaxbn.port.load: {path / 'model.py'} defines no class {meta.get('class')!r}, "
            'the model port.json names (renamed when editing? set "class" in port.json)'
        )
    variables = jax.tree.map(jnp.asarray, load_variables(path / "variables.msgpack"))
    info = {k: v for k, v in meta.items() if k not in ("ops", "frozen", "format", "class")}
    frozen = tuple(tuple(key) for key in meta.get("frozen", ()))
    return cls(), variables, tuple(meta.get("ops", ())), frozen, info


def _import(file: Path) -> Any:
    """Import ``file`` as a module of its own (registered, so tracebacks and
    ``inspect.getsource`` find it)."""
    name = f"jaxbn_saved_port_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PortError(f"jaxbn.port.load: cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module
