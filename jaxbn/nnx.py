"""jaxbn's BatchNorm layers for ``flax.nnx``.

>>> from jaxbn import nnx as bn
>>> layer = bn.BatchNorm2d(16)
"""

from ._nnx import BatchNorm as BatchNorm
from ._nnx import BatchNorm1d as BatchNorm1d
from ._nnx import BatchNorm2d as BatchNorm2d
from ._nnx import BatchNorm3d as BatchNorm3d
from ._nnx import update as update
from ._nnx import variables as variables

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "update", "variables"]
