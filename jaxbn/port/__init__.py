"""torch.nn.Module -> flax.linen Module, with the torch module's own variables.

``jaxbn.port`` is both the call and this package's names: ``jaxbn.port(model,
x)`` ports, and ``jaxbn.port.PortError``, ``jaxbn.port.without_dropout`` and
the rest are reachable from it as written, as from ``import jaxbn.port``.
torch is imported only when a port runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ._errors import PortError as PortError
from ._export import Exported as Exported
from ._export import load as load_exported
from ._interpret import TrainAware as TrainAware
from ._layers import Layer as Layer
from ._module import PortedModule as PortedModule
from ._port import Ported as Ported
from ._port import port as _port_function
from ._port import without_dropout as without_dropout
from ._saved import read as _read


def load(directory: str | os.PathLike[str]) -> Ported:
    """A port saved with :meth:`Ported.save`, where torch need not be installed.

    Imports the directory's ``model.py`` (that runs the file, as any import does:
    load only directories you trust) and reads its variables.

    >>> ported = jaxbn.port.load("resnet18-port")  # doctest: +SKIP
    >>> y = ported.module.apply(ported.variables, x, train=False)  # doctest: +SKIP

    Returns:
      :class:`Ported`: ``module`` (the generated class), ``variables`` (jax
      arrays), ``ops``, ``frozen`` and ``info`` (the versions and the torch
      class it was ported from, the example input).

    Raises:
      PortError: the directory is not a saved port, or was written by a jaxbn
        whose generated code this one may not run (the message names both
        versions).
    """
    return Ported(*_read(directory))


class _Port:
    # (the package's `port` is this object, and `jaxbn.port` with it: a call, and
    # the package's names as attributes, which a plain function cannot carry typed)
    __doc__ = _port_function.__doc__
    Layer = Layer
    PortError = PortError
    Ported = Ported
    PortedModule = PortedModule
    TrainAware = TrainAware
    without_dropout = staticmethod(without_dropout)
    load = staticmethod(load)
    load_exported = staticmethod(load_exported)
    Exported = Exported

    def __call__(
        self,
        module: Any,
        example_input: Any,
        *,
        converters: Mapping[Any, Any] | None = None,
        leaves: Iterable[Any] = (),
    ) -> Ported:
        return _port_function(module, example_input, converters=converters, leaves=leaves)

    __call__.__doc__ = _port_function.__doc__

    def __repr__(self) -> str:
        return "<jaxbn.port: call it as jaxbn.port(model, example_input)>"


port = _Port()

__all__ = [
    "Exported",
    "Layer",
    "PortError",
    "Ported",
    "PortedModule",
    "TrainAware",
    "load",
    "load_exported",
    "port",
    "without_dropout",
]
