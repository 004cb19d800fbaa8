"""torch.fx tracing with leaf modules, and compiling a graph into a :class:`Program`."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ._layers import Layer, plain_call
from ._module import REQUIRED, Node, Program, Ref
from ._ops import Checked, TrainAware, Unsupported, op, table

# Functions whose in-place form FX records as the plain operator.
_INPLACE_FUNCTIONS = frozenset({operator.iadd, operator.imul, operator.isub, operator.itruediv})


class PortError(ValueError):
    """A model could not be ported; the message lists every reason and the fix."""


def timm_notrace() -> tuple[frozenset[type], frozenset[Any]]:
    """timm's no-trace modules and functions, when timm is importable."""
    try:
        from timm.layers import _fx
    except ImportError:
        return frozenset(), frozenset()
    return frozenset(_fx.get_notrace_modules()), frozenset(_fx.get_notrace_functions())


def trace(
    module: Any, leaf_types: frozenset[type], leaf_paths: frozenset[str], autowrap: Iterable[Any]
) -> dict[bool, Any]:
    """``{training: fx.Graph}``: the module traced in train and in eval mode.

    Tracing does not run the module; the modes are restored afterwards.
    """
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: Any, module_qualified_name: str) -> bool:
            if type(m) in leaf_types or module_qualified_name in leaf_paths:
                return True
            return super().is_leaf_module(m, module_qualified_name)

    if type(module) in leaf_types:
        # The whole module is one leaf (a bare Conv2d): one call at path ''.
        graph = torch.fx.Graph()
        graph.output(graph.call_module("", (graph.placeholder("input"),)))
        return {True: graph, False: graph}
    modes = [(m, m.training) for m in module.modules()]
    graphs = {}
    try:
        for training in (True, False):
            module.train(training)
            tracer = Tracer(autowrap_functions=tuple(f for f in autowrap if callable(f)))
            try:
                graphs[training] = tracer.trace(module)
            except Exception as error:
                raise PortError(_trace_failure(module, tracer, error, training)) from error
    finally:
        for m, training in modes:
            m.training = training
    return graphs


def _trace_failure(module: Any, tracer: Any, error: Exception, training: bool) -> str:
    stack = list(tracer.module_stack.values())
    path, cls = stack[-1] if stack else ("", type(module))
    where = f"module {path!r} ({_name(cls)})" if path else f"{_name(cls)}.forward"
    return (
        f"torch.fx cannot trace {type(module).__name__} in {'train' if training else 'eval'} "
        f"mode; it failed in {where}: {type(error).__name__}: {error}\n"
        "Fix: keep that module as a leaf and give its converter, e.g. "
        f"jaxbn.port(model, x, leaves=[{cls.__name__}], converters={{{cls.__name__}: fn}}) "
        "where fn(torch_module) returns a flax.linen Module computing its forward "
        "(or a jax function of its inputs). Data-dependent Python control flow "
        "(`if x.sum() > 0`) and calls into non-torch libraries are what FX cannot trace."
    )


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class Compiler:
    """Turns fx graphs of one module into Programs; gathers every problem first."""

    root: Any
    converters: Mapping[Any, Any]
    layers: dict[str, Layer] = dataclasses.field(default_factory=dict)
    params: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    def rows(self) -> Mapping[Any, Any]:
        return table()

    def lookup(self, key: Any) -> Any:
        if key in self.converters:
            return self.converters[key]
        try:
            return self.rows().get(key)
        except TypeError:  # an unhashable target
            return None

    def layer(self, path: str, m: Any) -> Layer | None:
        """The Layer for the torch module ``m`` at ``path`` (cached)."""
        if path in self.layers:
            return self.layers[path]
        cls = type(m)
        if cls in self.converters:
            convert = _user_module_converter(self.converters[cls])
        else:
            convert = self.rows().get(cls)
        if convert is None:
            self.problems.append(
                f"{path or '<root>'}: module {_name(cls)} has no converter. Give one: "
                f"converters={{{cls.__name__}: fn}} with fn(module) -> flax.linen Module"
                + ("" if cls.__module__.startswith("torch.nn") else
                   ", or let FX trace into it (it is a leaf because of leaves= or timm)")
            )  # fmt: skip
            return None

        def child(name: str) -> Layer:
            layer = self.layer(f"{path}.{name}", getattr(m, name))
            self.layers.pop(f"{path}.{name}", None)  # lives inside the composite
            return layer if layer is not None else op(lambda x: x)

        try:
            layer = convert(m, child)
        except Unsupported as error:
            self.problems.append(f"{path}: {_name(cls)}: {error}")
            return None
        self.layers[path] = layer
        return layer

    def compile(self, graph: Any) -> Program:
        import torch

        inputs, defaults, nodes = [], [], []
        output: Any = None
        for node in graph.nodes:
            args = _refs(node.args)
            kwargs = tuple(_refs(dict(node.kwargs)).items())
            where = f"node {node.name!r} ({node.format_node()})"
            if node.op == "placeholder":
                inputs.append(node.name)
                defaults.append(node.args[0] if node.args else REQUIRED)
                continue
            if node.op == "output":
                output = _refs(node.args[0])
                continue
            if node.op == "get_attr":
                nodes.append(self._attr(node, where))
                continue
            alias = None
            if node.op == "call_module":
                m = self.root.get_submodule(node.target)
                layer = self.layer(node.target, m)
                if getattr(m, "inplace", False) is True:
                    alias = _first_ref(args)
                if layer is not None:
                    nodes.append(Node(node.name, "layer", node.target, args, kwargs, alias=alias))
                continue
            if node.op == "call_function":
                fn = self.lookup(node.target)
                if fn is None and _is_namedtuple(node.target):
                    fn = _namedtuple(node.target)
                if fn is None:
                    self.problems.append(
                        f"{where}: function {_qualname(node.target)} has no converter. Give "
                        f"converters={{{_qualname(node.target)}: fn}} with fn a jax function "
                        "of the same arguments"
                    )
                    continue
                if isinstance(fn, Checked):
                    try:
                        fn.check(*args, **dict(kwargs))
                    except Unsupported as error:
                        self.problems.append(f"{where}: {error}")
                        continue
                    fn = fn.fn
                if node.kwargs.get("inplace") is True or node.target in _INPLACE_FUNCTIONS:
                    alias = _first_ref(args)
            elif node.op == "call_method":
                fn = self.lookup(node.target)
                if fn is None:
                    self.problems.append(
                        f"{where}: tensor method .{node.target}() has no converter. Give "
                        f"converters={{{node.target!r}: fn}} with fn(tensor, *args) in jax"
                    )
                    continue
                if node.target.endswith("_") and not node.target.startswith("__"):
                    alias = _first_ref(args)
            else:
                self.problems.append(f"{where}: unknown fx op {node.op!r}")
                continue
            train_aware = isinstance(fn, TrainAware)
            target = fn.fn if isinstance(fn, TrainAware) else fn
            nodes.append(_call_node(node.name, target, args, kwargs, train_aware, alias, torch))
        return Program(tuple(inputs), tuple(defaults), tuple(nodes), output)

    def _attr(self, node: Any, where: str) -> Node:
        import torch

        prefix, _, name = node.target.rpartition(".")
        owner = self.root.get_submodule(prefix) if prefix else self.root
        value = getattr(owner, name)
        if isinstance(value, torch.nn.Parameter):
            dtype = str(value.dtype).removeprefix("torch.")
            self.params[node.target] = (tuple(value.shape), dtype)
            return Node(node.name, "param", node.target)
        if name in dict(owner.named_buffers(recurse=False)):
            self.problems.append(
                f"{where}: the buffer {node.target} is read outside a layer; keep its "
                f"module ({_name(type(owner))}) a leaf with a converter (leaves=, converters=)"
            )
        return Node(node.name, "constant", np.asarray(value.detach().cpu().numpy()))


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


def _first_ref(args: tuple[Any, ...]) -> str | None:
    return args[0].name if args and isinstance(args[0], Ref) else None


def _call_node(
    name: str,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: tuple[tuple[str, Any], ...],
    train_aware: bool,
    alias: str | None,
    torch: Any,
) -> Node:
    # `inplace=` has no meaning in JAX; the alias carries its effect.
    kwargs = tuple((k, v) for k, v in kwargs if k != "inplace")
    return Node(name, "call", fn, args, kwargs, train_aware, alias)


def _is_namedtuple(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def _namedtuple(cls: type) -> Callable[..., Any]:
    return cls


def _qualname(target: Any) -> str:
    from torch.fx.node import _get_qualified_name

    try:
        return _get_qualified_name(target)
    except Exception:  # not every callable has a qualified name
        return repr(target)


def _user_module_converter(fn: Callable[[Any], Any]) -> Callable[[Any, Any], Layer]:
    """A user's ``fn(module) -> flax Module | Layer | jax function`` as a table row."""

    def convert(m: Any, child: Any) -> Layer:
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
