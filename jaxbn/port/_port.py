"""``jaxbn.port``: any torch.fx-traceable torch module as a Flax module."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import types
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from .._torch import import_torch, to_numpy, to_tensor
from ..convert import LayoutWarning, from_torch
from ._errors import PortError
from ._interpret import Interpreter
from ._module import PortedModule
from ._trace import trace
from .ops._registry import resolve


@dataclasses.dataclass(frozen=True)
class Ported:
    """A ported torch module.

    Attributes:
      module: the ``flax.linen.Module``; call it as the torch forward, plus
        ``train``. Right after a port it runs the traced graph
        (:class:`PortedModule`); after :func:`jaxbn.port.load`, it is the
        generated class of the saved ``model.py``.
      variables: ``{'params': ..., 'batch_stats': ...}`` at the torch module
        paths, equal to ``jaxbn.from_torch(torch_module)``.
      ops: the names of the :mod:`jaxbn.port.ops` the port calls (a torch
        module, function or method each became), in the order first met.
      frozen: the Flax paths (``('params', 'body', 'conv1', 'kernel')``) of
        the parameters torch does not train (``requires_grad=False``: a
        detection backbone's frozen stem). JAX differentiates every
        parameter; to train as torch does, leave these out of the update
        (``optax.masked``).
      info: where it came from: the torch class (``'torch_class'``), the
        example input(s) (``'inputs'``: shape and dtype each) and the versions
        of torch, torchvision and timm it was ported with (those imported).
    """

    module: Any
    variables: dict[str, Any]
    ops: tuple[str, ...] = ()  # the jaxbn.port.ops it calls, in the order first met
    # Flax paths of the parameters torch does not train (requires_grad=False)
    frozen: tuple[tuple[str, ...], ...] = ()
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def source(self) -> str:
        """The model as Flax source that imports jax, flax, numpy and jaxbn only.

        One ``flax.linen`` class per traced torch class, named after it (the
        instances that differ only in numbers share one class, with those
        numbers as fields), leaf modules at their torch attribute names (the
        variables are :attr:`variables`, so :func:`jaxbn.to_torch` loads them
        into the torch model), every setting a state dict does not carry
        (eps, momentum, strides, padding) a literal, and ``train`` explicit.
        Formatted with ``ruff format`` where ruff is installed. It is yours to
        edit: replace a head, freeze a stage, and keep training.

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> text = port(model, torch.zeros(2, 3, 8, 8)).source()
        >>> print(text[text.index("    @nn.compact") :])
            @nn.compact
            def __call__(self, input, train: bool = False):
                conv = layers.Conv(
                    3, 4, (3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), groups=1, name="0"
                )(input)
                batch_norm2d = jaxbn.BatchNorm2d(
                    num_features=4, momentum=0.1, eps=1e-05, name="1"
                )(conv, use_running_average=not train)
                return batch_norm2d
        <BLANKLINE>

        Raises:
          PortError: the port calls something with no public name (a converter
            of your own): the ported module still runs, but has no source.
        """
        from ._source import source

        if isinstance(self.module, PortedModule):
            return source(self.module)
        import inspect

        return inspect.getsource(inspect.getmodule(type(self.module)))  # type: ignore[arg-type]

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        """Write the port to ``directory`` (created if missing; its parent must exist):
        ``model.py`` (:meth:`source`), ``variables.msgpack`` (both collections) and
        ``port.json`` (versions, torch class, example input, ops, frozen
        parameters). :func:`jaxbn.port.load` reads it back where torch is not
        installed. Returns the directory."""
        from ._saved import check_directory, save

        path = check_directory(directory)  # (before the source is generated)
        return save(self, path, self.source())

    def export(self, file: str | os.PathLike[str] | None = None) -> Any:
        """The eval function and the training step as ``jax.export`` programs that take
        any batch size, written to ``file`` when given (see :mod:`jaxbn.port._export`
        for the format, loaded with jax alone or :func:`jaxbn.port.load_exported`).

        Returns ``Exported(eval, train, variables)``: ``eval.call(variables, *inputs)``
        gives the outputs; ``train.call(variables, *inputs, jax.random.key(0))`` the
        outputs and the updated ``batch_stats`` of a training step. Writing a file
        needs flatbuffers (``pip install -e '.[export]'`` from the checkout).
        """
        from ._export import export, write

        inputs = [(tuple(shape), dtype) for shape, dtype in self.info.get("inputs", ())]
        if not inputs:
            raise PortError("jaxbn.port: this port does not record its input shapes to export")
        exported = export(self, inputs)
        if file is not None:
            write(exported, file)
        return exported


def port(
    module: Any,
    example_input: Any,
    *,
    converters: Mapping[Any, Any] | None = None,
    leaves: Iterable[Any] = (),
) -> Ported:
    """Port a torch module (a torchvision or timm CNN, ...) to flax.linen.

    The module is traced with ``torch.fx`` twice (in train and in eval mode,
    so ``if self.training`` branches such as auxiliary heads follow Flax's
    ``train``). Layers with variables, activations, pooling, dropout and
    library blocks with their own behaviour stay leaves, each converted by
    the op registry (:mod:`jaxbn.port.ops`) on its exact class (or a subclass
    that adds no method of its own); every other op
    is converted by function or method. Every BatchNorm becomes a jaxbn
    layer with that module's own ``momentum`` (``None`` too), ``eps``,
    ``affine`` and ``track_running_stats``. Activations keep torch's
    (N, C, H, W) layout, so flatten, view, cat, chunk and channel shuffles
    mean what they mean in torch.

    >>> import jax, numpy as np, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3))
    >>> ported = port(model, torch.zeros(2, 3, 8, 8))
    >>> jax.tree.map(np.shape, ported.variables)
    {'batch_stats': {'1': {'mean': (4,), 'num_batches_tracked': (), 'var': (4,)}}, 'params': {'0': {'bias': (4,), 'kernel': (3, 3, 3, 4)}, '1': {'bias': (4,), 'scale': (4,)}}}
    >>> x = np.ones((2, 3, 8, 8), np.float32)
    >>> ported.module.apply(ported.variables, x, train=False).shape
    (2, 4, 6, 6)
    >>> y, updates = ported.module.apply(ported.variables, x, train=True, mutable=["batch_stats"])
    >>> int(updates["batch_stats"]["1"]["num_batches_tracked"])
    1

    Args:
      module: a ``torch.nn.Module``; it is not modified.
      example_input: an input the torch module accepts: a tensor or numpy
        array, a tuple of them for several inputs (RAFT's two images), or a
        dict of keyword inputs by the forward's parameter names (Python
        values such as ``num_flow_updates=4`` too). The module runs on it
        once while it is traced (sizes the forward branches on are taken
        from it), and the Flax module is traced on it once, abstractly, to
        check that its variables are exactly those of
        :func:`jaxbn.from_torch`. The ported module takes the same inputs,
        positionally or by name.
      converters: extra or overriding rows of the op table: a module class
        -> ``fn(torch_module)`` returning a ``flax.linen.Module`` (called
        with the module's inputs), a :class:`Layer` or a jax function; a
        function, or a tensor method name, -> a jax function with torch's
        signature (wrap it in :class:`TrainAware` to receive ``train=`` and
        ``rng=``).
      leaves: module classes or module paths that FX should not trace into
        (each needs a converter): the fix for a module FX cannot trace.

    Returns:
      :class:`Ported` with ``module`` and ``variables``.

    Raises:
      PortError: listing every unsupported module, function and method
        (torch path, fx node, what to do), or FX's reason it cannot trace
        the model and the fix. Nothing is ported partially.
    """
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"jaxbn.port: `module` must be a torch.nn.Module, got {type(module).__name__}"
        )
    _refuse_shared_tensors(module)
    converters = dict(converters or {})
    leaves = list(leaves)
    interpreter = Interpreter(module, converters)
    leaf_types = frozenset(leaf for leaf in leaves if isinstance(leaf, type))
    leaf_paths = frozenset(leaf for leaf in leaves if isinstance(leaf, str))

    def is_leaf(m: Any, path: str) -> bool:
        return interpreter.is_leaf(m) or type(m) in leaf_types or path in leaf_paths

    # Plain Python functions with an op (stochastic depth, drop path) stay one
    # call wherever they are called from, not only where fx.wrap registered them.
    autowrap = {
        k
        for k in [*resolve().functions, *converters]
        if isinstance(k, types.FunctionType)
        and k.__module__.split(".")[0] not in ("torch", "jaxbn")
    }
    args, kwargs = _as_inputs(example_input)
    graphs = trace(module, is_leaf, autowrap, _as_torch(args), _as_torch(kwargs))

    train_program = interpreter.compile(graphs[True])
    eval_program = interpreter.compile(graphs[False])
    if interpreter.problems:
        problems = list(dict.fromkeys(interpreter.problems))
        raise PortError(
            f"jaxbn.port: {len(problems)} unsupported operation(s) in "
            f"{type(module).__name__}; nothing was ported:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nA converter is a table row: jaxbn.port(model, x, converters={key: fn}); "
            "see help(jaxbn.port)."
        )
    flax_module = PortedModule(
        eval_program=eval_program,
        train_program=train_program,
        layers=tuple(interpreter.layers.items()),
        example=tuple(
            (x.shape, x.dtype.name) for x in [*args, *kwargs.values()] if isinstance(x, np.ndarray)
        ),
        torch_class=f"{type(module).__module__}.{type(module).__qualname__}",
    )
    variables = _variables(flax_module, module, args, kwargs)
    frozen = tuple(
        interpreter.flax_key(name) for name, p in module.named_parameters() if not p.requires_grad
    )
    info = {
        "torch_class": flax_module.torch_class,
        "inputs": [[list(shape), dtype] for shape, dtype in flax_module.example],
        **{
            library: sys.modules[library].__version__
            for library in ("torch", "torchvision", "timm")
            if library in sys.modules
        },
    }
    return Ported(flax_module, variables, tuple(interpreter.ops), frozen, info)


def _refuse_shared_tensors(module: Any) -> None:
    """A tensor under two names (a module registered twice, as CoaT's shared convolutions;
    tied weights) would be two variables that training moves apart: refused, named."""
    paths: dict[int, list[str]] = {}
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in tensors:
        paths.setdefault(id(tensor), []).append(name)
    shared = [names for names in paths.values() if len(names) > 1]
    if shared:
        listed = "; ".join(" = ".join(names) for names in shared[:5])
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise PortError(
            f"jaxbn.port: {len(shared)} tensor(s) of {type(module).__name__} are the same "
            f"tensor under two names: {listed}{more}. A port has one variable per name, "
            "which training would move apart; shared modules and tied weights are not "
            "ported yet"
        )


def _as_inputs(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(positional, keyword) inputs: tensors as numpy arrays, Python values as they are."""

    def value(x: Any) -> Any:
        if hasattr(x, "detach"):
            return to_numpy(x)
        if isinstance(x, (bool, int, float, str, type(None))):
            return x
        if isinstance(x, (tuple, list)) and all(isinstance(v, (int, float)) for v in x):
            return x  # (a size, as output_size=(7, 7))
        return np.asarray(x)

    if isinstance(example_input, Mapping):
        return (), {str(k): value(v) for k, v in example_input.items()}
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    return tuple(value(x) for x in inputs), {}


def _as_torch(values: Any) -> Any:
    """Arrays as torch tensors (bfloat16 kept), other values as they are."""
    convert = lambda x: to_tensor(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    if isinstance(values, dict):
        return {k: convert(v) for k, v in values.items()}
    return [convert(v) for v in values]


def _variables(
    flax_module: PortedModule, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The converter's variables, with the ported module's own declaration as the template.

    The template is what places bare parameters (layer scale) and proves
    that every layer declares exactly the converter's names, shapes and
    dtypes. The port flattens in torch's order, so the converter's flatten
    warning does not apply.
    """
    shapes = jax.eval_shape(
        lambda: flax_module.init(jax.random.key(0), *args, train=False, **kwargs)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)
        variables, report = from_torch(module, shapes, strict=False)
    if not report.ok:
        raise PortError(
            "jaxbn.port: the ported module's variables differ from what jaxbn.from_torch "
            "makes of the torch module (a converter that declares other variables, or a "
            "module whose tensors no converter kind covers):\n" + report.describe_problems()
        )
    return variables


def without_dropout(module: Any) -> Any:
    """A copy of a torch module with every dropout probability set to 0.

    Torch's and JAX's random masks cannot agree, so a comparison of a model
    and its port in training turns them off: ``nn.Dropout`` and its kin,
    torchvision's ``StochasticDepth``, timm's ``DropPath``/``DropBlock2d``
    (``drop_prob``), and the ``drop_rate`` of modules that call functional
    dropout themselves (DenseNet's layers, timm's classifier heads).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    >>> without_dropout(model)[1].p, model[1].p
    (0.0, 0.5)
    """
    import copy

    torch = import_torch()
    quiet = copy.deepcopy(module)
    for m in quiet.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == (
            "StochasticDepth"
        ):
            m.p = 0.0
        for name in ("drop_prob", "drop_rate"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return quiet
