"""The flax.linen module that runs a traced torch graph.

A :class:`Program` is the torch.fx graph with every torch object replaced by
its JAX counterpart: plain Python, no torch. :class:`PortedModule` binds each
leaf layer at its torch module path (``layer1.0.conv1`` ->
``layer1/0/conv1``), so its variables are those :func:`jaxbn.from_torch`
produces, and runs the nodes in order. Depends on jax and flax only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import PortError
from ._layers import Layer


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()  # the default of a graph input that has none


@dataclasses.dataclass(frozen=True)
class Ref:
    """The value of an earlier node."""

    name: str


@dataclasses.dataclass(frozen=True)
class Node:
    """One step: a layer at a torch path, a function, or a bare variable.

    ``kind`` is 'layer' (``target`` is the torch module path), 'call'
    (``target`` is a JAX function; train-aware ones take ``train=``/``rng=``),
    'variable' (``target`` is (Flax module path, :class:`Variable`, whether a
    layer at that path declares it): a parameter or buffer read outside a
    layer) or 'constant'.
    ``alias`` names an input that torch mutates in place (``inplace=True``,
    ``add_``): later nodes see this node's result under that name too.
    ``scope`` is (torch path, qualified class name) of each module whose forward the
    node runs in, outermost first (the root's own forward: empty): what the
    generated source's classes are cut along.
    """

    name: str
    kind: str
    target: Any
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    train_aware: bool = False
    alias: str | None = None
    scope: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Program:
    """A graph's inputs (with defaults), nodes and output structure."""

    inputs: tuple[str, ...]  # the placeholders' node names
    defaults: tuple[Any, ...]
    nodes: tuple[Node, ...]
    output: Any
    names: tuple[str, ...] = ()  # the forward's parameter names, for keyword inputs


def resolve(value: Any, env: Mapping[str, Any]) -> Any:
    """``value`` with every :class:`Ref` replaced, keeping tuples (named too), lists, dicts."""
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        items = [resolve(v, env) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(resolve(value.start, env), resolve(value.stop, env), resolve(value.step, env))
    if isinstance(value, np.dtype):  # torch.long as JAX holds it now: int32 unless x64 is on
        return jax.dtypes.canonicalize_dtype(value)
    return value


def ref_names(value: Any) -> list[str]:
    """The names of the nodes ``value`` (arguments, an output) refers to."""
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, (tuple, list)):
        return [name for item in value for name in ref_names(item)]
    if isinstance(value, dict):
        return [name for item in value.values() for name in ref_names(item)]
    if isinstance(value, slice):
        return ref_names((value.start, value.stop, value.step))
    return []


class PortedModule(nn.Module):
    """A torch module's forward, as Flax.

    Call it as torch's forward (NCHW input), plus ``train``: True for a
    training step (BatchNorm uses and updates batch statistics, dropout and
    stochastic depth draw from the ``'dropout'`` RNG; pass
    ``mutable=['batch_stats']``), False for eval. Each mode runs the graph
    traced with the torch module in that mode, so ``if self.training``
    branches (auxiliary heads) behave as in torch.
    """

    eval_program: Program
    train_program: Program
    layers: tuple[tuple[str, Layer], ...]
    # the example input(s) it was traced on: (shape, dtype name) each
    example: tuple[tuple[tuple[int, ...], str], ...] = ()
    torch_class: str = "Model"  # the torch module's qualified class name

    @nn.compact
    def __call__(self, *args: Any, train: bool = False, **kwargs: Any) -> Any:
        program = self.train_program if train else self.eval_program
        inputs = _bind(program, args, kwargs)
        run = _Run(self, train)
        try:
            if self.is_initializing():
                # Declare the variables only the other mode uses too (GoogLeNet's
                # auxiliary heads run in training only); init is never a step.
                other = self.eval_program if train else self.train_program
                _Run(self, False, run).run(other, _bind(other, args, kwargs))
            return run.run(program, inputs)
        except (TypeError, ValueError) as error:  # say the shapes it was ported at, if others
            if type(error) not in _SAID or not str(error).startswith("jaxbn.port: "):
                raise
            given = [tuple(jnp.shape(a)) for a in [*args, *kwargs.values()]]
            ported = [tuple(shape) for shape, _ in self.example]
            shapes = (
                f" (ported at input shape {', '.join(map(str, ported))}; called with "
                f"{', '.join(map(str, given))})"
                if given != ported
                else ""
            )
            raise type(error)(f"{error}{shapes}{_layout_hint(given, self.example)}") from None


# The errors a ported module says where they happened, keeping their class: jax's shape
# and dtype errors (TypeError, ValueError), jaxbn's layers' ValueErrors, PortError.
_SAID = (TypeError, ValueError, PortError)


class _Run:
    """One call of a :class:`PortedModule`'s graph: one method per node kind, as
    ``torch.fx.Interpreter`` has; scopes, layers and bare parameters bound once."""

    def __init__(self, module: PortedModule, train: bool, shared: _Run | None = None) -> None:
        self.module, self.train = module, train
        self.layers = dict(module.layers)
        # (the init of the other mode's graph and this call share what they bind)
        self.scopes: dict[tuple[str, ...], Any] = shared.scopes if shared else {}
        self.bound: dict[str, nn.Module] = shared.bound if shared else {}
        self.bare: dict[Any, Any] = shared.bare if shared else {}

    def run(self, program: Program, inputs: dict[str, Any]) -> Any:
        env = dict(inputs)
        for node in program.nodes:
            a = resolve(node.args, env)
            k = dict(resolve(node.kwargs, env))
            try:
                out = getattr(self, node.kind)(node, a, k)
            except (TypeError, ValueError) as error:  # jax's shape errors: say where
                if type(error) not in _SAID or str(error).startswith("jaxbn.port: "):
                    raise
                raise type(error)(
                    f"jaxbn.port: {_where(node)} failed on {_shapes(a)}: {str(error).rstrip('.')}"
                ) from error
            env[node.name] = out
            if node.alias is not None:
                env[node.alias] = out
        return resolve(program.output, env)

    def layer(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A leaf module at its torch path (``node.target``)."""
        path = node.target
        if path not in self.bound:
            # path '' is a module that is a leaf itself: its variables are at the root.
            where = self.scope(tuple(path.split("."))) if path else self.module.scope
            self.bound[path] = self.layers[path].make(parent=where)
        return self.layers[path].call(self.bound[path], self.train, *args, **kwargs)

    def call(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A JAX function; a train-aware one gets the flag and the dropout RNG."""
        if node.train_aware:
            kwargs |= {"train": self.train, "rng": lambda: self.module.make_rng("dropout")}
        return node.target(*args, **kwargs)

    def variable(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A parameter or buffer read outside a layer."""
        path, variable, in_layer = node.target
        owner = self.scope(path) if path else self.module.scope
        if in_layer:  # a layer's own tensor: the layer declares it
            return variable.read(owner)
        if node.target not in self.bare:
            self.bare[node.target] = variable.declare(owner)
        return self.bare[node.target]

    def constant(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A tensor the trace captured."""
        return jnp.asarray(np.asarray(node.target))

    def scope(self, path: tuple[str, ...]) -> Any:
        if path not in self.scopes:
            parent = self.scope(path[:-1]) if len(path) > 1 else self.module.scope
            assert parent is not None
            self.scopes[path] = parent.push(path[len(path) - 1], reuse=True)
        return self.scopes[path]


def _where(node: Node) -> str:
    """The layer's torch path (``layer1.0.conv1``), or the op and the module it runs in."""
    if node.kind == "layer":
        return node.target or "the model"
    name = getattr(node.target, "__name__", type(node.target).__name__)
    return f"{name} in {node.scope[-1][0]}" if node.scope else name


def _shapes(args: tuple[Any, ...]) -> str:
    shapes = [tuple(jnp.shape(a)) for a in args if hasattr(a, "shape")]
    if not shapes:
        return "its inputs"
    return ("input of shape " if len(shapes) == 1 else "inputs of shapes ") + ", ".join(
        map(str, shapes)
    )


def _layout_hint(given: list[tuple[int, ...]], example: Any) -> str:
    """For an input that looks channels-last next to the example torch took (N, C, ...)."""
    for shape, (ported, _) in zip(given, example, strict=False):
        if len(shape) >= 3 and len(shape) == len(ported) and shape[1] != ported[1] == shape[-1]:
            order = (0, len(shape) - 1, *range(1, len(shape) - 1))
            return (
                f"; an input of shape {shape} looks channels-last: the port takes torch's "
                f"layout, channels at axis 1, here {ported[1]}: x.transpose{order}"
            )
    return ""


def _bind(program: Program, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The graph's inputs from a call, as Python binds a forward's arguments."""
    names = program.names or program.inputs
    listed = ", ".join(names)
    if len(args) > len(names):
        raise TypeError(
            f"the ported module takes at most {len(names)} positional inputs ({listed}), "
            f"got {len(args)}"
        )
    given = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(
                f"the ported module has no input {name!r}; its inputs are {listed} (and train=)"
            )
        if name in given:
            raise TypeError(f"the ported module got two values for its input {name!r}")
        given[name] = value
    missing = [
        name
        for name, default in zip(names, program.defaults, strict=True)
        if name not in given and default is REQUIRED
    ]
    if missing:
        raise TypeError(f"the ported module needs its inputs {listed}; missing {missing}")
    return {
        node: given.get(name, default)
        for node, name, default in zip(program.inputs, names, program.defaults, strict=True)
    }
