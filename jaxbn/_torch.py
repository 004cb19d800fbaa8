"""The one place jaxbn meets torch: importing it, and tensors <-> numpy arrays bit for bit.

Shared by the converters, the parity harness and the benchmark; torch is
imported only when one of these functions runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch


def import_torch() -> Any:
    """torch, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("torch")
    except ImportError as error:
        raise ImportError(
            "this part of jaxbn converts from or compares with PyTorch, which is "
            "not installed. Install it with: pip install 'jaxbn[torch]'"
        ) from error


def optional_torch() -> Any:
    """torch, or None where it is not installed (for tools that can do without it)."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A view of ``tensor`` as numpy; bfloat16 becomes ``ml_dtypes.bfloat16``.

    The bits are untouched (NaN payloads, -0.0, denormals); the tensor is
    detached and moved to the CPU first. The result may share memory with
    the tensor: copy it before the tensor can change.
    """
    torch = import_torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_tensor(array: Any) -> torch.Tensor:
    """A torch tensor holding a copy of ``array``'s bits (bfloat16 kept)."""
    torch = import_torch()
    array = np.asarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())
