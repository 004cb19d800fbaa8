"""An fx graph of a torch module into a :class:`Program`: one method per node kind.

As ``torch.fx.Interpreter`` runs a graph node by node (``placeholder``,
``get_attr``, ``call_module``, ``call_function``, ``call_method``,
``output``), :class:`Interpreter` translates it node by node, looking each
target up in the op registry (:mod:`jaxbn.port.ops`) and in the user's
converters, and gathers every problem before anything is ported.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .._torch import to_numpy
from ..convert import inspect as plan
from ..convert._layouts import LAYOUTS
from ._layers import Layer, Variable, WithVariables, op, plain_call
from ._module import REQUIRED, Node, Program, Ref, ref_names
from ._trace import VALUE
from .ops import getitem, setitem
from .ops._registry import AsLayer, Call, Unsupported, resolve, with_batch_axis


@dataclasses.dataclass(frozen=True)
class TrainAware:
    """A user's converter that also takes ``train=`` (the Flax flag) and ``rng=`` (a key maker)."""

    fn: Callable[..., Any]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Methods a subclass may define and still be its parent's op: construction and
# printing, nothing forward can run.
_INERT = frozenset({"__init__", "extra_repr", "__repr__", "__setstate__", "_get_name"})


def _adds_behaviour(cls: type) -> str | None:
    """The first method ``cls`` defines that its forward could run, or None."""
    for name, value in vars(cls).items():
        if name in _INERT or isinstance(value, (staticmethod, classmethod)):
            continue
        if callable(value) or isinstance(value, property):
            return name
    return None


def registered_base(cls: type, registered: Mapping[type, Any]) -> tuple[type | None, str]:
    """The class of ``registered`` that ``cls`` is, or is a plain subclass of (one that adds
    no method of its own: torchvision's ``Conv3DSimple`` is a Conv3d); else None and why."""
    if cls in registered:
        return cls, ""
    for i, base in enumerate(cls.__mro__[1:], start=1):
        if base in registered:
            for klass in cls.__mro__[:i]:
                method = _adds_behaviour(klass)
                if method is not None:
                    return None, (
                        f"it subclasses {_name(base)} but defines {method}(), so it may "
                        "compute something else"
                    )
            return base, ""
    return None, ""


@dataclasses.dataclass
class _Draft:
    """A program being built."""

    inputs: list[str] = dataclasses.field(default_factory=list)
    defaults: list[Any] = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    output: Any = None
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> torch path
    # In torch a view shares its tensor's memory: node -> the node whose memory it views,
    # and the nodes an in-place op changed through another view (node -> that op).
    views: dict[str, str] = dataclasses.field(default_factory=dict)
    stale: dict[str, str] = dataclasses.field(default_factory=dict)
    # Views that are basic slices of a tensor (``y[:, :n]``): node -> (that tensor, index).
    slices: dict[str, tuple[str, Any]] = dataclasses.field(default_factory=dict)
    # The torch paths of the modules the graph calls.
    called: frozenset[str] = frozenset()


@dataclasses.dataclass
class Interpreter:
    """Translates the fx graphs of one torch module; ``problems`` lists what has no port."""

    root: Any
    converters: Mapping[Any, Any]
    layers: dict[str, Layer] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    ops: dict[str, None] = dataclasses.field(default_factory=dict)  # registry ops used, in order

    def compile(self, graph: Any) -> Program:
        draft = _Draft(called=frozenset(n.target for n in graph.nodes if n.op == "call_module"))
        for node in graph.nodes:
            start = len(draft.nodes)
            getattr(self, node.op)(node, draft)
            scope = _scope(node)
            draft.nodes[start:] = [dataclasses.replace(n, scope=scope) for n in draft.nodes[start:]]
        return Program(
            tuple(draft.inputs),
            tuple(draft.defaults),
            tuple(draft.nodes),
            draft.output,
            tuple(draft.names),
        )

    # --- one method per node kind -------------------------------------------

    def placeholder(self, node: Any, draft: _Draft) -> None:
        draft.inputs.append(node.name)
        draft.names.append(str(node.target).lstrip("*"))
        draft.defaults.append(node.args[0] if node.args else REQUIRED)

    def output(self, node: Any, draft: _Draft) -> None:
        draft.output = _refs(node.args[0])
        self._check_reads(node, draft.output, draft)

    def get_attr(self, node: Any, draft: _Draft) -> None:
        """A parameter or persistent buffer read outside a layer is a variable where the
        converter puts it; anything else (a non-persistent buffer, a constant) a constant."""
        draft.attributes[node.name] = node.target
        prefix, _, name = node.target.rpartition(".")
        owner = self.root.get_submodule(prefix) if prefix else self.root
        persistent = name in owner._parameters or (
            name in owner._buffers and name not in owner._non_persistent_buffers_set
        )
        if not persistent:
            # (the value as traced: FX's own tensor constants are gone from the module)
            array = to_numpy(node.meta[VALUE]).copy()
            draft.nodes.append(Node(node.name, "constant", array))
            return
        found = self._variable(node.target, name)
        if found is None:
            self.problems.append(
                f"node {node.name!r}: the tensor {node.target} has no Flax variable "
                f"(jaxbn.convert.inspect cannot place it: {self._why(node.target)})"
            )
            return
        # (a layer the forward never calls declares nothing: its tensor is then declared
        # where it is read, as EVA's attention reads its qkv Linear's weight alone)
        in_layer = owner is not self.root and self.is_leaf(owner) and prefix in draft.called
        draft.nodes.append(Node(node.name, "variable", (*found, in_layer)))

    def call_module(self, node: Any, draft: _Draft) -> None:
        m = self.root.get_submodule(node.target)
        layer = self.layer(node.target, m)
        if layer is None:
            return
        alias = _first_ref(node.args) if getattr(m, "inplace", False) is True else None
        args, kwargs = _refs(node.args), tuple(_refs(dict(node.kwargs)).items())
        base, _ = registered_base(type(m), resolve().modules)
        view = base is not None and resolve().modules[base][0].entry in _VIEWS
        self._emit(
            node, Node(node.name, "layer", node.target, args, kwargs, alias=alias), draft, view
        )

    def call_function(self, node: Any, draft: _Draft) -> None:
        call = self.function(node.target)
        if call is None:
            self.problems.append(
                f"{_where(node)}: function {_qualname(node.target)} has no converter. Give "
                f"converters={{{_qualname(node.target)}: fn}} with fn a jax function "
                "of the same arguments"
            )
            return
        self._call(node, call, draft, in_place=node.kwargs.get("inplace") is True)

    def call_method(self, node: Any, draft: _Draft) -> None:
        call = self.method(node.target)
        if call is None:
            self.problems.append(
                f"{_where(node)}: tensor method .{node.target}() has no converter. Give "
                f"converters={{{node.target!r}: fn}} with fn(tensor, *args) in jax"
            )
            return
        self._call(node, call, draft, in_place=False)

    # --- memory torch shares, and a port does not --------------------------------

    def _emit(self, node: Any, compiled: Node, draft: _Draft, view: bool) -> None:
        """Add ``compiled``. In torch an in-place op changes every view of its tensor; a
        port has no shared memory, so reading another view afterwards is a problem."""
        self._check_reads(node, (compiled.args, compiled.kwargs), draft)
        draft.nodes.append(compiled)
        first = _first_ref(compiled.args)
        if view and first is not None:
            draft.views[compiled.name] = draft.views.get(first, first)
            if compiled.target is getitem and _basic_index(compiled.args[1]):
                draft.slices[compiled.name] = (first, compiled.args[1])
        if compiled.alias is not None:
            written = self._write_back(compiled, draft)
            root = draft.views.get(compiled.alias, compiled.alias)
            for name in (root, *(n for n, r in draft.views.items() if r == root)):
                if name not in (compiled.alias, written):
                    draft.stale[name] = f"node {node.name!r} ({node.format_node()})"
            # (its result is, in torch, the tensor it changed: a view of the same memory)
            draft.views[compiled.name] = root

    def _write_back(self, compiled: Node, draft: _Draft) -> str | None:
        """An in-place op on a slice of a tensor (``y[:, :n].zero_()``, Swin v2's qkv
        bias) changes that tensor in torch: the port writes the result back into it
        (``y.at[:, :n].set(...)``) and rebinds it. Returns its name, or None where the
        view is no plain slice of a tensor that is no view itself."""
        found = draft.slices.get(str(compiled.alias))
        if found is None or found[0] in draft.views:
            return None
        base, index = found
        draft.nodes.append(
            Node(f"{compiled.name}_written", "call", setitem, (Ref(base), index,
                 Ref(compiled.name)), alias=base)
        )  # fmt: skip
        return base

    def _check_reads(self, node: Any, value: Any, draft: _Draft) -> None:
        for name in ref_names(value):
            if name in draft.stale:
                self.problems.append(
                    f"{_where(node)}: reads {name!r}, which {draft.stale[name]} changed in "
                    "place through another view of the same memory; a port has no shared "
                    "memory: make that op out of place"
                )

    # --- lookups --------------------------------------------------------------

    def function(self, target: Any) -> Call | None:
        user = self._user(target)
        if user is not None:
            return user
        try:
            found = resolve().functions.get(target)
        except TypeError:  # an unhashable target
            return None
        if found is None and _is_namedtuple(target):
            return Call(target)
        return found

    def method(self, name: str) -> Call | None:
        user = self._user(name)
        return user if user is not None else resolve().methods.get(name)

    def _user(self, key: Any) -> Call | None:
        try:
            fn = self.converters.get(key)
        except TypeError:
            return None
        if fn is None:
            return None
        if isinstance(fn, TrainAware):
            return Call(fn.fn, train_aware=True)
        return Call(fn)

    def is_leaf(self, m: Any) -> bool:
        """Whether a module is ported whole (a table row or a converter), not traced into."""
        cls = type(m)
        return cls in self.converters or registered_base(cls, resolve().modules)[0] is not None

    def layer(self, path: str, m: Any) -> Layer | None:
        """The Layer for the torch module ``m`` at ``path`` (cached); None and a problem if
        it has none."""
        if path in self.layers:
            return self.layers[path]
        cls = type(m)
        try:
            layer = self._convert(path, m)
        except Unsupported as error:
            self.problems.append(f"{path}: {_name(cls)}: {error}")
            return None
        if layer is not None:
            self.layers[path] = layer
        return layer

    def _convert(self, path: str, m: Any) -> Layer | None:
        cls = type(m)
        if cls in self.converters:
            return _user_module_converter(self.converters[cls])(m)
        modules = resolve().modules
        base, why = registered_base(cls, modules)
        if base is None:
            self.problems.append(
                f"{path or '<root>'}: module {_name(cls)} has no converter"
                + (f" ({why})" if why else "")
                + f". Give one: converters={{{cls.__name__}: fn}} with fn(module) -> "
                "flax.linen Module"
                + ("" if cls.__module__.startswith("torch.nn") else
                   ", or let FX trace into it (it is a leaf because of leaves=)")
            )  # fmt: skip
            return None
        call, rule = modules[base]
        self.ops[call.entry] = None
        if isinstance(rule, AsLayer):

            def child(name: str) -> Layer:
                layer = self.layer(f"{path}.{name}", getattr(m, name))
                self.layers.pop(f"{path}.{name}", None)  # lives inside the composite
                return layer if layer is not None else op(lambda x: x)

            return rule.convert(m, child)
        keywords = rule.keywords(m)
        if call.check is not None:
            call.check(**keywords)
        fn = call.fn
        if rule.unbatched is not None:
            fn = functools.partial(with_batch_axis, fn, rule.unbatched)
        if not rule.tensors:
            return op(functools.partial(fn, **keywords), call.train_aware)
        variables = []
        for tensor in rule.tensors:
            if getattr(m, tensor, None) is None:
                continue
            found = self._variable(f"{path}.{tensor}" if path else tensor, tensor)
            if found is None:
                raise Unsupported(
                    f"its tensor {tensor!r} has no Flax variable "
                    f"({self._why(f'{path}.{tensor}' if path else tensor)})"
                )
            variables.append(found[1])
        return Layer(
            functools.partial(WithVariables, fn, tuple(keywords.items()), tuple(variables)),
            plain_call,
        )

    # --- variables ------------------------------------------------------------

    @functools.cached_property
    def _plan(self) -> Any:
        """Where the converter puts each tensor of the root module."""
        return plan(self.root)

    @functools.cached_property
    def _entries(self) -> dict[str, Any]:
        return {entry.torch_key: entry for entry in self._plan.entries}

    def _variable(self, key: str, argument: str) -> tuple[tuple[str, ...], Variable] | None:
        """(Flax module path, Variable) of the torch tensor ``key``, as the converter has it.

        A tensor of a module of no layer kind (layer scale, a token) keeps its
        name, in ``params`` or (a buffer) ``buffers``: the converter's 'Param'
        kind, which the port's own template then selects.
        """
        prefix = key.rpartition(".")[0]
        # (a module with a tensor its layer kind lacks, as timm's ScaledStdConv2d's gain,
        # is traced into: all its tensors keep their names)
        partial = prefix and any(line.startswith(f"{prefix}.") for line in self._plan.unconverted)
        entry = None if partial else self._entries.get(key)
        if entry is not None:
            collection, *path, name = entry.flax_key
            axes = tuple(LAYOUTS[entry.layout][1](len(entry.flax_shape)))
            variable = Variable(argument, collection, name, entry.flax_shape, entry.dtype, axes)
            return tuple(path), variable
        if not partial and not any(
            line.startswith(f"{prefix or '<root>'}:") for line in self._plan.unconverted
        ):
            return None  # ambiguous, or not a tensor at all
        tensor = self.root.get_parameter(key) if key in self._parameters else None
        if tensor is None:
            tensor = self.root.get_buffer(key)
        collection = "params" if key in self._parameters else "buffers"
        shape = tuple(tensor.shape)
        variable = Variable(
            argument, collection, argument, shape, str(tensor.dtype).removeprefix("torch."),
            tuple(range(len(shape))),
        )  # fmt: skip
        return tuple(prefix.split(".")) if prefix else (), variable

    def flax_key(self, key: str) -> tuple[str, ...]:
        """Where the torch tensor ``key`` is among the Flax variables."""
        found = self._variable(key, key.rpartition(".")[2])
        assert found is not None, key
        path, variable = found
        return (variable.collection, *path, variable.name)

    @functools.cached_property
    def _parameters(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.root.named_parameters())

    def _why(self, key: str) -> str:
        prefix = key.rpartition(".")[0] or "<root>"
        lines = [*self._plan.unconverted, *self._plan.ambiguous]
        return next((line for line in lines if line.startswith(f"{prefix}:")), "no layer kind")

    # --- calls ----------------------------------------------------------------

    def _call(self, node: Any, call: Call, draft: _Draft, in_place: bool) -> None:
        if call.entry:
            self.ops[call.entry] = None
        args, kwargs = _refs(node.args), dict(_refs(dict(node.kwargs)))
        if call.check is not None:
            try:
                bound = inspect.signature(call.fn).bind_partial(*args, **kwargs)
                call.check(**bound.arguments)
            except Unsupported as error:
                self.problems.append(f"{_where(node)}: {error}")
                return
            except TypeError as error:  # arguments its port does not take
                self.problems.append(f"{_where(node)}: {call.entry or 'the converter'}: {error}")
                return
        alias = _first_ref(args) if in_place or call.in_place else None
        view = call.entry in _VIEWS
        if alias is not None and alias in draft.attributes:
            self.problems.append(
                f"{_where(node)}: updates the module's tensor {draft.attributes[alias]} in "
                "place; a port carries no state but BatchNorm statistics (keep the module a "
                "leaf with a converter: leaves=, converters=)"
            )
            return
        # `inplace=` has no meaning in JAX; the alias carries its effect.
        kwargs.pop("inplace", None)
        compiled = Node(
            node.name, "call", call.fn, args, tuple(kwargs.items()), call.train_aware, alias
        )
        self._emit(node, compiled, draft, view)


# Ops whose result is, in torch, a view of their first argument's memory (or the
# tensor itself): an in-place op through one changes the others.
_VIEWS = frozenset({
    "getitem", "getattr", "reshape", "reshape_as", "transpose", "permute", "expand",
    "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "split", "chunk", "unbind",
    "detach", "unfold_dim", "identity",
})  # fmt: skip


def _basic_index(index: Any) -> bool:
    """An index that makes a view in torch: ints, slices (sizes may bound them), None and
    Ellipsis; not a tensor of indices or a mask (those copy) or a node whose kind the
    graph does not tell."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


def _scope(node: Any) -> tuple[tuple[str, str], ...]:
    """(torch path, qualified class name) of the modules whose forward runs ``node``, outermost
    first; a leaf module's own call is not one of them."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack and stack[-1][0] == node.target:
        stack.pop()
    return tuple((str(path), f"{cls.__module__}.{cls.__qualname__}") for path, cls in stack)


def _where(node: Any) -> str:
    """The node, and the module whose forward it is in."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    inside = f" in module {stack[-1][0]!r} ({_name(stack[-1][1])})" if stack else ""
    return f"node {node.name!r}{inside} ({node.format_node()})"


def _refs(value: Any) -> Any:
    """fx arguments with Nodes replaced by Refs and torch dtypes by jax's."""
    import torch
    import torch.fx
    from torch.fx.node import map_aggregate

    def convert(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return Ref(a.name)
        if isinstance(a, torch.dtype):
            return jnp.dtype(str(a).removeprefix("torch."))
        return a

    return map_aggregate(value, convert)


def _first_ref(args: Any) -> str | None:
    first = args[0] if args else None
    name = getattr(first, "name", None)
    return name if isinstance(name, str) else None


def _is_namedtuple(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def _qualname(target: Any) -> str:
    from torch.fx.node import _get_qualified_name

    try:
        return _get_qualified_name(target)
    except Exception:  # not every callable has a qualified name
        return repr(target)


def _user_module_converter(fn: Callable[[Any], Any]) -> Callable[[Any], Layer]:
    """A user's ``fn(module) -> flax Module | Layer | jax function`` as a Layer."""

    def convert(m: Any) -> Layer:
        result = fn(m)
        if isinstance(result, Layer):
            return result
        if isinstance(result, nn.Module):
            return Layer(functools.partial(result.clone), plain_call)
        if callable(result):
            return op(result)
        raise Unsupported(
            f"the converter {fn!r} returned {type(result).__name__}; return a flax.linen "
            "Module, a jaxbn.port.Layer or a jax function"
        )

    return convert
