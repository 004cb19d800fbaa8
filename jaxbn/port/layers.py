"""The Flax layers and helpers a port's generated source calls, by their public names.

A ported model's ``model.py`` (:meth:`jaxbn.port.Ported.source`) builds its
torch leaf modules from these (a ``Conv2d`` is :class:`Conv` on (N, C, H, W)
input, a ``Linear`` :class:`Linear`; BatchNorm is :class:`jaxbn.BatchNorm2d`
and its kin), calls torch's functions as :mod:`jaxbn.port.ops`, and places a
module or a tensor at a torch path below its own with :func:`scope`,
:func:`declare` and :func:`read`. Depends on jax and flax only.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

from ._layers import Composite as Composite
from ._layers import Layer as Layer
from ._layers import Op as Op
from ._layers import Variable as Variable
from ._layers import WithVariables as WithVariables
from ._layers import batch_norm_call as batch_norm_call
from ._layers import plain_call as plain_call
from ._layers import train_call as train_call
from .ops._linear import Conv as Conv
from .ops._linear import Linear as Linear
from .ops._linear import same_padding_call as same_padding_call
from .ops._registry import with_batch_axis as with_batch_axis


def constant(packed: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A constant array the generated source carries packed (zlib, then base64): an
    index table torch computed when the model was built (relative positions)."""
    data = zlib.decompress(base64.b64decode(packed))
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def scope(module: Any, path: tuple[str, ...]) -> Any:
    """The Flax scope ``path`` below ``module``'s own: where a torch module sits whose
    parent container (a ``ModuleList``) has no forward of its own.

    Pass it as a layer's ``parent=``; an empty ``path`` is ``module``'s own scope.
    """
    where = module.scope
    for name in path:
        where = where.push(name, reuse=True)
    return where


def declare(module: Any, path: tuple[str, ...], variable: Variable) -> Any:
    """Declare a torch tensor read outside any layer (a class token, a layer scale) at
    ``path`` below ``module``, and return it in torch's layout."""
    return variable.declare(scope(module, path) if path else module)


def read(module: Any, path: tuple[str, ...], variable: Variable) -> Any:
    """A layer's own tensor at ``path`` below ``module``, read outside that layer (zeros
    before the layer has declared it, at init), in torch's layout."""
    return variable.read(scope(module, path))


__all__ = [
    "Composite",
    "Conv",
    "Layer",
    "Linear",
    "Op",
    "Variable",
    "WithVariables",
    "batch_norm_call",
    "constant",
    "declare",
    "plain_call",
    "read",
    "same_padding_call",
    "scope",
    "train_call",
    "with_batch_axis",
]
