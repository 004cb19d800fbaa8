"""The op registry: one entry per op, holding every torch spelling of it.

An entry is a JAX function with torch's functional signature (the names
and defaults of ``torch.nn.functional``), registered with :func:`register`
under each way torch code calls it:

- ``'torch.nn.functional.relu'``, ``'torch.relu'``, ``'operator.add'``,
  ``'timm.layers.drop.drop_path'``: a function, by its import path;
- ``'Tensor.relu'``: a tensor method (the tensor is the first argument);
  ``'Tensor.relu_'``, its in-place form (the port rebinds the tensor);
- ``modules={'torch.nn.ReLU': attributes()}``: a module class whose
  forward is this op called with the module's attributes
  (:func:`attributes`, :class:`FromModule`), with its own variables
  (:func:`with_variables`), or a Flax layer of its own (:class:`AsLayer`).

Spellings are strings, resolved to torch objects only when a port runs
(:func:`resolve`), so the ops import jax alone and a saved port runs
where torch is not installed. A spelling that names nothing in the
installed torch (or a library that is absent) is left out of the
dispatch tables and listed in :attr:`Dispatch.unresolved`.

Adding an op is one decorated function (and one case in
``parity_tests/test_ops.py``); ``softsign`` is registered so::

    @register("torch.nn.functional.softsign", modules={"torch.nn.Softsign": attributes()})
    def softsign(input):
        return input / (1 + jnp.abs(input))

>>> from jaxbn.port.ops import ENTRIES
>>> entry = ENTRIES["softsign"]
>>> entry.family, entry.spellings, [name for name, _ in entry.modules]
('activations', ('torch.nn.functional.softsign',), ['torch.nn.Softsign'])
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any


class Unsupported(Exception):
    """A configuration of an op that no implementation computes (the port lists every one)."""


@dataclasses.dataclass(frozen=True)
class FromModule:
    """A module whose forward is the op, called with ``keywords(module)``."""

    keywords: Callable[[Any], dict[str, Any]]
    # torch tensor names of the module passed to the op under the same names
    # (``weight``, ``bias``), declared where the converter puts them.
    tensors: tuple[str, ...] = ()
    # The input rank the module reads as one unbatched sample (InstanceNorm2d: 3),
    # given a batch axis of one for the op, as torch's module does; None: none.
    unbatched: int | None = None


def per_axis(value: Any, d: int) -> tuple[int, ...]:
    """torch's int-or-tuple argument (``kernel_size=3``, ``stride=(2, 1)``) for ``d`` axes."""
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    return value * d if len(value) == 1 else value


def with_batch_axis(
    fn: Callable[..., Any], rank: int, input: Any, *args: Any, **kwargs: Any
) -> Any:
    """``fn`` on an input of ``rank`` axes as a batch of one (a module's unbatched input)."""
    if getattr(input, "ndim", None) == rank:
        return fn(input[None], *args, **kwargs)[0]
    return fn(input, *args, **kwargs)


def attributes(*names: str, **fixed: Any) -> FromModule:
    """The module's attributes ``names`` as the op's keywords of the same names, plus ``fixed``.

    >>> import types
    >>> attributes("beta", mode="reflect").keywords(types.SimpleNamespace(beta=2.0))
    {'beta': 2.0, 'mode': 'reflect'}
    """
    return FromModule(lambda m: {**{name: getattr(m, name) for name in names}, **fixed})


def with_variables(keywords: FromModule, *tensors: str) -> FromModule:
    """``keywords``, plus the module's own tensors ``tensors`` (those that are not None)."""
    return dataclasses.replace(keywords, tensors=tensors)


@dataclasses.dataclass(frozen=True)
class AsLayer:
    """A module that becomes a Flax layer of its own: ``convert(module, child) -> Layer``.

    ``child(name)`` converts the submodule ``name`` (the children of a
    composite leaf such as timm's ``BatchNormAct2d``).
    """

    convert: Callable[[Any, Callable[[str], Any]], Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One op: its JAX function and every torch spelling of it."""

    name: str  # the function's name, public in jaxbn.port.ops
    family: str  # 'activations', 'pooling', ...
    fn: Callable[..., Any]
    spellings: tuple[str, ...]  # functions by import path; 'Tensor.<name>' methods
    modules: tuple[tuple[str, FromModule | AsLayer], ...]
    # fn also takes train= (the Flax flag) and rng= (makes a 'dropout' key)
    train_aware: bool = False
    # check(*args, **kwargs) on the traced call's constant arguments (tensors
    # are placeholders) raises Unsupported for a configuration fn does not compute
    check: Callable[..., None] | None = None


ENTRIES: dict[str, Entry] = {}


def register(
    *spellings: str,
    modules: Mapping[str, FromModule | AsLayer] | None = None,
    train_aware: bool = False,
    check: Callable[..., None] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated JAX function as the op torch calls by ``spellings``.

    ``name`` is the op's public name where the function's own would shadow a
    builtin (``max``, ``sum``); by default the function's name.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        entry_name = name or fn.__name__
        if entry_name in ENTRIES:
            raise ValueError(f"an op named {entry_name!r} is registered twice")
        family = fn.__module__.rpartition(".")[2].lstrip("_")
        ENTRIES[entry_name] = Entry(
            entry_name,
            family,
            fn,
            tuple(spellings),
            tuple((modules or {}).items()),
            train_aware,
            check,
        )
        return fn

    return decorate


# --- what a port dispatches on -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """What a traced call becomes: ``fn`` (train-aware or not) and its port-time check."""

    fn: Callable[..., Any]
    train_aware: bool = False
    check: Callable[..., None] | None = None
    entry: str = ""  # the registry entry ('' for a user's converter)
    in_place: bool = False  # the spelling mutates its first argument (``add_``, ``iadd``)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The registry resolved against the installed torch: what each torch object becomes."""

    functions: Mapping[Any, Call]  # function object -> Call
    methods: Mapping[str, Call]  # tensor method name -> Call
    modules: Mapping[type, tuple[Call, FromModule | AsLayer]]  # class -> (the op, how)
    unresolved: tuple[str, ...]  # spellings that name nothing installed


def _in_place(spelling: str) -> bool:
    """``Tensor.add_``, ``torch.nn.functional.relu_``, ``operator.iadd``."""
    module, _, name = spelling.rpartition(".")
    if module == "operator":
        return name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "setitem")
    return name.endswith("_") and not name.startswith("_")


def _import(path: str) -> Any:
    """The object at the import path ``path``, or None."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except Exception:  # absent, or broken (a torchvision built for another torch)
            continue
        try:
            for name in parts[split:]:
                value = getattr(value, name)
        except AttributeError:
            return None
        return value
    return None


@functools.cache
def resolve() -> Dispatch:
    """Every entry's spellings as torch objects (imports torch, and torchvision and timm
    where installed; built once)."""
    functions: dict[Any, Call] = {}
    methods: dict[str, Call] = {}
    modules: dict[type, tuple[Call, FromModule | AsLayer]] = {}
    unresolved: list[str] = []

    def claim(table: dict[Any, Any], key: Any, value: Any, spelling: str) -> None:
        # (torch.relu_ and F.relu_ are one object: two spellings of one op are fine)
        held = table.get(key)
        entry = lambda v: v[0].entry if isinstance(v, tuple) else v.entry  # noqa: E731
        if held is not None and entry(held) != entry(value):
            raise RuntimeError(
                f"{spelling} is a spelling of two ops, {entry(held)} and {entry(value)}"
            )
        table[key] = value

    for entry in ENTRIES.values():
        call = Call(entry.fn, entry.train_aware, entry.check, entry.name)
        for spelling in entry.spellings:
            spelled = dataclasses.replace(call, in_place=_in_place(spelling))
            if spelling.startswith("Tensor."):
                claim(methods, spelling.removeprefix("Tensor."), spelled, spelling)
            elif (target := _import(spelling)) is not None:
                claim(functions, target, spelled, spelling)
            else:
                unresolved.append(spelling)
        for spelling, rule in entry.modules:
            cls = _import(spelling)
            if isinstance(cls, type):
                claim(modules, cls, (call, rule), spelling)
            else:
                unresolved.append(spelling)
    return Dispatch(functions, methods, modules, tuple(unresolved))
