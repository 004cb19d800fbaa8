"""torch.fx tracing of a torch module in train and in eval mode, with leaf modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


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
    module: Any, is_leaf: Callable[[Any, str], bool], autowrap: Iterable[Any]
) -> dict[bool, Any]:
    """``{training: fx.Graph}``: the module traced in train and in eval mode.

    Tracing does not run the module; the modes are restored afterwards.
    """
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: Any, module_qualified_name: str) -> bool:
            # (FX's own rule keeps torch.nn's modules whole: one without an op
            # is named as a module, not as the functions inside it)
            return is_leaf(m, module_qualified_name) or super().is_leaf_module(
                m, module_qualified_name
            )

    if is_leaf(module, ""):
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
