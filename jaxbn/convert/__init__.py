"""PyTorch checkpoints <-> Flax variables: strict, two-way, bit-exact.

One declarative spec per layer kind (:data:`SPECS`) and one flat plan that
:func:`from_torch`, :func:`to_torch` and :func:`inspect` all run on. torch
is imported only when a function needs it.
"""

from ._convert import LayoutWarning as LayoutWarning
from ._convert import batch_norm_settings as batch_norm_settings
from ._convert import default_flax_path as default_flax_path
from ._convert import default_torch_path as default_torch_path
from ._convert import from_torch as from_torch
from ._convert import inspect as inspect
from ._convert import to_torch as to_torch
from ._files import CheckpointError as CheckpointError
from ._files import load_checkpoint as load_checkpoint
from ._files import load_variables as load_variables
from ._files import save_variables as save_variables
from ._layouts import KINDS as KINDS
from ._layouts import LAYERS as LAYERS
from ._layouts import SPECS as SPECS
from ._layouts import TORCH_MODULES as TORCH_MODULES
from ._layouts import LayerSpec as LayerSpec
from ._layouts import Tensor as Tensor
from ._plan import ConversionError as ConversionError
from ._plan import Entry as Entry
from ._plan import Report as Report
from ._plan import Setting as Setting

__all__ = [
    "KINDS",
    "LAYERS",
    "SPECS",
    "TORCH_MODULES",
    "CheckpointError",
    "ConversionError",
    "Entry",
    "LayerSpec",
    "LayoutWarning",
    "Report",
    "Setting",
    "Tensor",
    "batch_norm_settings",
    "default_flax_path",
    "default_torch_path",
    "from_torch",
    "inspect",
    "load_checkpoint",
    "load_variables",
    "save_variables",
    "to_torch",
]
