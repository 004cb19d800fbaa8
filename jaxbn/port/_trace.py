"""torch.fx tracing of a torch module in train and in eval mode, with leaf modules, that
follows Python control flow on sizes.

Plain ``torch.fx`` cannot trace ``if h % 7:`` or ``for i in range(n)`` where ``h`` and
``n`` come from a tensor's shape. Here a node can tell its value on the example input:
when a forward first needs a Python value, the nodes traced so far are run on the
example (under ``no_grad``; the module's attributes, buffers and torch's RNG are
restored afterwards), and from then on each new node as it is needed. Where the
forward turns a size into a Python
bool, int or length, the trace takes the example's branch and records a
:func:`~jaxbn.port.ops.guard`: the ported module then checks, when it is traced
at other shapes, that the size takes the same branch, and raises a
:class:`PortError` naming the place if it does not. Shapes the forward only
computes with (``x.view(b, c, h * w)``) stay symbolic, so a ported ResNet takes
any batch and size. Control flow on tensor *values* (``if x.sum() > 0``) is
refused, as FX refuses it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import operator
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from ._errors import PortError
from .ops import guard

VALUE = "jaxbn_value"  # node.meta key: the node's value on the example input
_STATIC = "jaxbn_static"  # node.meta key: a Python value computed from sizes alone
_ERROR = "jaxbn_error"  # node.meta key: why running the node on the example failed
_UNKNOWN = object()
# Tensor attributes and methods whose result depends on the shape alone.
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_DEVICE_ATTRIBUTES = frozenset({"type", "index"})


def trace(
    module: Any,
    is_leaf: Callable[[Any, str], bool],
    autowrap: Iterable[Any],
    inputs: Sequence[Any] = (),
    keywords: Mapping[str, Any] | None = None,
) -> dict[bool, Any]:
    """``{training: fx.Graph}``: the module traced in train and in eval mode, on ``inputs``
    and ``keywords`` (torch tensors, or other values of the forward's arguments).

    The module is left as it was: its attributes (modes; caches a forward fills,
    as timm's attention-bias caches, which would otherwise keep FX's proxies),
    its buffers' values and torch's RNG state are restored afterwards.
    """
    import torch.fx

    if is_leaf(module, ""):
        # The whole module is one leaf (a bare Conv2d): one call at path ''.
        graph = torch.fx.Graph()
        graph.output(graph.call_module("", (graph.placeholder("input"),)))
        return {True: graph, False: graph}
    graphs = {}
    nones = _none_arguments(module, inputs, keywords or {})
    for training in (True, False):
        # Each trace starts from the module as it was (a cache the train trace filled
        # would hand the eval trace the train trace's proxies).
        with _restored(module):
            module.train(training)
            tracer = _tracer_class()(is_leaf, inputs, keywords or {}, autowrap)
            try:
                with torch.no_grad(), _recorded_factories(tracer), _traced_through(autowrap):
                    graphs[training] = tracer.trace(module, concrete_args=nones or None)
            except PortError:
                raise
            except Exception as error:
                raise PortError(_trace_failure(module, tracer, error, training)) from error
        for node in graphs[training].nodes:  # (FX names a None argument `mask_1`)
            if node.op == "placeholder" and node.target.removesuffix("_1") in nones:
                node.target = node.target.removesuffix("_1")
    return graphs


def _none_arguments(
    module: Any, inputs: Sequence[Any], keywords: Mapping[str, Any]
) -> dict[str, None]:
    """The forward's arguments past the positional inputs that are None, given so or by
    default (``mask=None``): traced as None, since ``if mask is not None`` cannot be
    seen on a proxy. The ported module checks that they stay None."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    nones: dict[str, None] = {}
    for index, parameter in enumerate(parameters):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if index >= len(inputs) and keywords.get(parameter.name, parameter.default) is None:
            nones[parameter.name] = None
    return nones


@contextlib.contextmanager
def _traced_through(keep: Iterable[Any]) -> Iterator[None]:
    """Trace into the functions a library marked ``torch.fx.wrap`` (timm's "no-trace"
    functions: grids and windows built from sizes), but for those in ``keep``: FX
    wraps them because plain FX cannot follow their control flow on sizes, which
    this tracer can (with guards). Kept wrapped, they were calls with no op."""
    import torch.fx._symbolic_trace as fx_trace

    keep = {id(f) for f in keep}
    table = fx_trace._wrapped_fns_to_patch
    saved = dict(table)
    for key, scope in saved.items():
        function = scope.get(key[1])
        if (
            isinstance(function, types.FunctionType)
            and id(function) not in keep
            and function.__module__.partition(".")[0] != "torch"
        ):
            del table[key]
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


@contextlib.contextmanager
def _restored(module: Any) -> Iterator[None]:
    """Run a block, then put back every submodule's attributes (containers one level deep:
    a cache dict a forward fills in place), its buffers' values and torch's RNG state."""
    import torch

    # (each container kept as the same object, its contents put back in place: a hook's
    # handle, for one, holds on to the dict it removes itself from)
    attributes = [
        (
            m,
            dict(vars(m)),
            [(v, copy.copy(v)) for v in vars(m).values() if isinstance(v, (dict, list, set))],
        )
        for m in module.modules()
    ]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        for m, saved, containers in attributes:
            for container, contents in containers:
                if isinstance(container, list):
                    container[:] = contents
                else:
                    container.clear()
                    container.update(contents)
            vars(m).clear()
            vars(m).update(saved)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        torch.random.set_rng_state(rng)


# torch functions that take Python data, not tensors, so that a size passed to them
# (torch.tensor(h), torch.zeros(b, c)) never reaches FX's __torch_function__.
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones")


@contextlib.contextmanager
def _recorded_factories(tracer: Any) -> Iterator[None]:
    """While tracing, ``torch.tensor(size)`` and ``torch.zeros(b, c)`` are graph nodes, not
    errors."""
    import torch
    import torch.fx
    from torch.fx.node import map_aggregate

    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def recorded(original: Callable[..., Any]) -> Callable[..., Any]:
        def factory(*args: Any, **kwargs: Any) -> Any:
            found: list[bool] = []
            map_aggregate((args, kwargs), lambda a: found.append(isinstance(a, torch.fx.Proxy)))
            if any(found):
                return tracer.create_proxy("call_function", original, args, kwargs)
            return original(*args, **kwargs)

        return factory

    try:
        for name, original in originals.items():
            setattr(torch, name, recorded(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def _tracer_class() -> type:
    """The tracer (a class made on first use: it subclasses torch's)."""
    global _TRACER
    if _TRACER is None:
        _TRACER = _make_tracer()
    return _TRACER


_TRACER: type | None = None


def _make_tracer() -> type:
    import torch
    import torch.fx
    from torch.fx.node import map_aggregate
    from torch.fx.proxy import Attribute, TraceError

    def value_of(a: Any) -> Any:
        return a.meta.get(VALUE, _UNKNOWN) if isinstance(a, torch.fx.Node) else a

    class ConcreteProxy(torch.fx.Proxy):
        """A proxy whose size-derived value becomes Python where the forward needs one."""

        def __getattr__(self, k: str) -> Any:
            if k in _DEVICE_ATTRIBUTES:
                value = cast(Any, self.tracer).value(self.node)
                if isinstance(value, torch.device):
                    # (x.device.type: a constant, as autocast(device_type=...) needs one)
                    return getattr(value, k)
            return cast(Any, ConcreteAttribute)(self, k)

        def __len__(self) -> int:
            tracer = cast(Any, self.tracer)
            if isinstance(tracer.value(self.node), torch.Tensor):
                return tracer.static(self.size(0), "int")
            return len(tracer.static(self, "len"))

        def __index__(self) -> int:
            return cast(Any, self.tracer).static(self, "int")

        def __int__(self) -> int:
            return cast(Any, self.tracer).static(self, "int")

        def __setitem__(self, index: Any, value: Any) -> None:
            # x[index] = value: an in-place op (the port rebinds x), which FX's proxy lacks
            self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

        def __iter__(self) -> Iterator[Any]:
            # (FX unpacks `a, b = x` without asking the tracer, so without a guard: a
            # tuple of another length, or a tensor of another first size, passed)
            if cast(Any, self.tracer).value(self.node) is _UNKNOWN:
                return super().__iter__()
            return cast(Any, self.tracer).iter(self)

    class ConcreteAttribute(Attribute, ConcreteProxy):
        """``x.shape`` and friends (a node made when first used, as FX's)."""

    class Tracer(torch.fx.Tracer):
        def __init__(
            self,
            is_leaf: Callable[[Any, str], bool],
            inputs: Sequence[Any],
            keywords: Mapping[str, Any],
            autowrap: Iterable[Any],
        ) -> None:
            super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))
            self._keywords = dict(keywords)
            # Buffers are read through the graph too, so that a forward that updates one
            # in place (a BatchNorm traced into) is seen, not run on the module.
            self.proxy_buffer_attributes = True
            self._is_leaf = is_leaf
            self._inputs = list(inputs)
            self._placeholders = 0
            self._evaluating = False

        # --- leaves -----------------------------------------------------------

        def is_leaf_module(self, m: Any, module_qualified_name: str) -> bool:
            # (FX's own rule keeps torch.nn's modules whole: one without an op
            # is named as a module, not as the functions inside it)
            return self._is_leaf(m, module_qualified_name) or super().is_leaf_module(
                m, module_qualified_name
            )

        def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
            if self._evaluating:  # a leaf computing its value: nothing to record
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
            if self._evaluating:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        # --- values -----------------------------------------------------------

        def proxy(self, node: Any) -> Any:
            return ConcreteProxy(node, self)

        def create_node(self, *args: Any, **kwargs: Any) -> Any:
            node = super().create_node(*args, **kwargs)
            if node.op in ("placeholder", "get_attr"):  # (cheap: no computation)
                node.meta[VALUE], node.meta[_STATIC] = self._evaluate(node)
            return node

        def value(self, node: Any) -> Any:
            """The node's value on the example input. Computed only when a forward first
            needs a Python value (most models never do, and are traced as fast as by FX),
            then for every node so far, in order."""
            if VALUE not in node.meta:
                for earlier in self.graph.nodes:
                    if VALUE not in earlier.meta:
                        earlier.meta[VALUE], earlier.meta[_STATIC] = self._evaluate(earlier)
            return node.meta.get(VALUE, _UNKNOWN)

        def _evaluate(self, node: Any) -> tuple[Any, bool]:
            """The node's value on the example input, and whether it is a Python value
            computed from sizes alone."""
            if node.op == "placeholder":
                index, self._placeholders = self._placeholders, self._placeholders + 1
                name = str(node.target).lstrip("*")
                if index < len(self._inputs):
                    value = self._inputs[index]
                elif name in self._keywords:
                    value = self._keywords[name]
                else:
                    value = node.args[0] if node.args else _UNKNOWN
                return value, not isinstance(value, torch.Tensor) and value is not _UNKNOWN
            if node.op == "get_attr":
                self._evaluating = True  # (module attribute reads would make proxies)
                try:
                    value: Any = self.root
                    for part in node.target.split("."):
                        value = getattr(value, part)
                finally:
                    self._evaluating = False
                return value, False
            args = map_aggregate(node.args, value_of)
            kwargs = map_aggregate(node.kwargs, value_of)
            known: list[bool] = []
            map_aggregate((args, kwargs), lambda a: known.append(a is not _UNKNOWN))
            if not all(known):
                return _UNKNOWN, False
            self._evaluating = True
            try:
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = self.root.get_submodule(node.target)(*args, **kwargs)
            except Exception as error:  # forcing this node says why it has no value
                node.meta[_ERROR] = f"{type(error).__name__}: {error}"
                return _UNKNOWN, False
            finally:
                self._evaluating = False
            return value, self._is_static(node, value)

        def _is_static(self, node: Any, value: Any) -> bool:
            if isinstance(value, torch.Tensor):
                return False
            if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:  # fmt: skip
                return True
            if node.op == "call_method" and node.target in _SHAPE_METHODS:
                return True
            flags: list[bool] = []
            map_aggregate(
                (node.args, node.kwargs),
                lambda a: (
                    flags.append(a.meta.get(_STATIC, False))
                    if isinstance(a, torch.fx.Node)
                    else None
                ),
            )
            return all(flags)

        # --- where the forward needs a Python value -------------------------------

        def static(self, proxy: Any, kind: str) -> Any:
            """The size-derived value of ``proxy``, guarded; an error for a tensor's data."""
            node = proxy.node
            value = self.value(node)
            if value is _UNKNOWN:
                failed = next((a.meta[_ERROR] for a in self.graph.nodes if _ERROR in a.meta), None)
                if failed is not None:
                    raise TraceError(
                        f"{self._where(kind)} needs a Python value, and the example input "
                        f"does not run through the forward before it: {failed}"
                    )
            # (the length of a tuple is sizes alone, whatever it holds: chunk's pieces)
            sized = kind == "len" and isinstance(value, (tuple, list))
            if value is _UNKNOWN or not (node.meta.get(_STATIC, False) or sized):
                raise TraceError(
                    f"{self._where(kind)} needs a Python value computed from tensor data, "
                    "not from sizes alone: a compiled program cannot branch on it"
                )
            expected = {"bool": bool, "int": int, "len": len}[kind](value)
            subject = proxy if kind != "len" else self.create_proxy(
                "call_function", len, (proxy,), {}
            )  # fmt: skip
            self.create_proxy("call_function", guard, (subject, expected, self._where(kind)), {})
            return value if kind == "len" else expected

        def to_bool(self, obj: Any) -> bool:
            return self.static(obj, "bool")

        def iter(self, obj: Any) -> Iterator[Any]:
            value = self.value(obj.node)
            if isinstance(value, torch.Tensor):
                count = self.static(obj.size(0), "int")
            else:
                count = len(self.static(obj, "len"))
            return iter([obj[i] for i in range(count)])

        def _where(self, kind: str) -> str:
            """The module the forward is in, and the line of its source that needs a value."""
            stack = list(self.module_stack.values())
            path, cls = stack[-1] if stack else ("", type(self.root))
            block = f"module {path!r} ({_name(cls)})" if path else f"{_name(cls)}.forward"
            frame = _user_frame()
            if frame is None:
                return f"a size in {block}"
            line = linecache.getline(frame.filename, frame.lineno or 0).strip()
            if frame.name != "forward":  # a helper the forward calls
                block = f"{frame.name}, called in {block}"
            return f"`{line}` ({frame.filename}:{frame.lineno}, in {block}; its {kind}())"

    return Tracer


# Files of the tracing machinery, not of any forward.
_MACHINERY = ("/torch/fx/", "/torch/nn/modules/module.py", "/torch/overrides.py", "/jaxbn/port/")


def _user_frame() -> traceback.FrameSummary | None:
    """The innermost frame of a forward's code (the model's, or torch's own modules')."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if not any(part in name for part in _MACHINERY) and "/contextlib.py" not in name:
            return frame
    return None


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
        "(or a jax function of its inputs). Python control flow on tensor values "
        "(`if x.sum() > 0`) and calls into non-torch libraries are what FX cannot trace; "
        "control flow on sizes is followed."
    )


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
