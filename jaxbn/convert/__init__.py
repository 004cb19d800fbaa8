"""PyTorch checkpoints <-> Flax variables: strict, two-way, bit-exact.

torch is imported only when a function needs it.
"""

from ._convert import ConversionError as ConversionError
from ._convert import Entry as Entry
from ._convert import Report as Report
from ._convert import default_flax_path as default_flax_path
from ._convert import default_torch_path as default_torch_path
from ._convert import from_torch as from_torch
from ._convert import inspect as inspect
from ._convert import to_torch as to_torch
from ._files import CheckpointError as CheckpointError
from ._files import load_checkpoint as load_checkpoint
from ._files import load_variables as load_variables
from ._files import save_variables as save_variables
from ._layouts import LAYERS as LAYERS
from ._layouts import TORCH_MODULES as TORCH_MODULES

__all__ = [
    "LAYERS",
    "TORCH_MODULES",
    "CheckpointError",
    "ConversionError",
    "Entry",
    "Report",
    "default_flax_path",
    "default_torch_path",
    "from_torch",
    "inspect",
    "load_checkpoint",
    "load_variables",
    "save_variables",
    "to_torch",
]
