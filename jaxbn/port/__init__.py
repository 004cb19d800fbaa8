"""torch.nn.Module -> flax.linen Module, with the torch module's own variables.

torch is imported only when :func:`port` runs.
"""

from ._errors import PortError as PortError
from ._interpret import TrainAware as TrainAware
from ._layers import Layer as Layer
from ._module import PortedModule as PortedModule
from ._port import Ported as Ported
from ._port import port as port
from ._port import without_dropout as without_dropout

__all__ = ["Layer", "PortError", "Ported", "PortedModule", "TrainAware", "port", "without_dropout"]
