"""jaxbn: BatchNorm for JAX and Flax that is exactly PyTorch's."""

from . import nnx as nnx
from ._frozen import FrozenBatchNorm2d as FrozenBatchNorm2d
from ._functional import BatchStats as BatchStats
from ._functional import batch_norm as batch_norm
from ._layers import synchronized as synchronized
from ._linen import BatchNorm as BatchNorm
from ._linen import BatchNorm1d as BatchNorm1d
from ._linen import BatchNorm2d as BatchNorm2d
from ._linen import BatchNorm3d as BatchNorm3d
from ._version import __version__ as __version__
from .convert import ConversionError as ConversionError
from .convert import Report as Report
from .convert import from_torch as from_torch
from .convert import load_checkpoint as load_checkpoint
from .convert import to_torch as to_torch
from .port import Ported as Ported
from .port import port as port

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchStats",
    "ConversionError",
    "FrozenBatchNorm2d",
    "Ported",
    "Report",
    "batch_norm",
    "from_torch",
    "load_checkpoint",
    "nnx",
    "port",
    "synchronized",
    "to_torch",
]
