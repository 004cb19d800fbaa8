"""PyTorch -> Flax names and layouts, one declarative table per layer kind.

Reading a row: the torch tensor ``<module>.<torch>`` becomes the Flax
variable ``<collection>/<module path>/<flax>``, rearranged by ``layout``.
Every layout is a pure axis permutation (or an integer cast for the step
counter), so conversion in either direction is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Param:
    """One tensor of a layer kind: its PyTorch name, Flax place and layout."""

    torch: str
    collection: str  # 'params' or 'batch_stats'
    flax: str
    layout: str  # a key of LAYOUTS


def _to_spatial_first(ndim: int) -> tuple[int, ...]:
    # (O, I, *k) -> (*k, I, O): Flax's Conv kernel from torch's Conv weight,
    # and Flax's ConvTranspose(transpose_kernel=True) kernel (*k, O, I) from
    # torch's ConvTranspose weight (I, O, *k).
    return (*range(2, ndim), 1, 0)


def _from_spatial_first(ndim: int) -> tuple[int, ...]:
    return (ndim - 1, ndim - 2, *range(ndim - 2))


# layout -> (torch-to-flax axes, flax-to-torch axes) as functions of ndim.
LAYOUTS = {
    "same": (lambda ndim: tuple(range(ndim)), lambda ndim: tuple(range(ndim))),
    "transposed": (lambda ndim: (1, 0), lambda ndim: (1, 0)),
    "spatial-first": (_to_spatial_first, _from_spatial_first),
    "count": (lambda ndim: (), lambda ndim: ()),  # a scalar; its dtype is handled apart
}

_BIAS = Param("bias", "params", "bias", "same")

LAYERS: Mapping[str, tuple[Param, ...]] = {
    "BatchNorm": (
        Param("weight", "params", "scale", "same"),
        _BIAS,
        Param("running_mean", "batch_stats", "mean", "same"),
        Param("running_var", "batch_stats", "var", "same"),
        Param("num_batches_tracked", "batch_stats", "num_batches_tracked", "count"),
    ),
    "Linear": (Param("weight", "params", "kernel", "transposed"), _BIAS),
    "Conv": (Param("weight", "params", "kernel", "spatial-first"), _BIAS),
    "Norm": (Param("weight", "params", "scale", "same"), _BIAS),
    "Embedding": (Param("weight", "params", "embedding", "same"),),
    # torchvision.ops.FrozenBatchNorm2d: four buffers, none trained, no counter.
    "FrozenBatchNorm": (
        Param("weight", "batch_stats", "scale", "same"),
        Param("bias", "batch_stats", "bias", "same"),
        Param("running_mean", "batch_stats", "mean", "same"),
        Param("running_var", "batch_stats", "var", "same"),
    ),
}

# torch.nn class names -> layer kind. ConvTranspose weights map to the kernel
# of flax.linen.ConvTranspose(transpose_kernel=True), which computes what
# torch's ConvTranspose computes, with the same permutation as Conv.
TORCH_MODULES: Mapping[str, str] = {
    **{f"BatchNorm{d}d": "BatchNorm" for d in (1, 2, 3)},
    **{f"LazyBatchNorm{d}d": "BatchNorm" for d in (1, 2, 3)},
    "SyncBatchNorm": "BatchNorm",
    "Linear": "Linear",
    "LazyLinear": "Linear",
    **{f"{conv}{d}d": "Conv" for conv in ("Conv", "ConvTranspose") for d in (1, 2, 3)},
    **{f"Lazy{conv}{d}d": "Conv" for conv in ("Conv", "ConvTranspose") for d in (1, 2, 3)},
    "LayerNorm": "Norm",
    "GroupNorm": "Norm",
    "RMSNorm": "Norm",
    "Embedding": "Embedding",
    "FrozenBatchNorm2d": "FrozenBatchNorm",  # torchvision.ops
    "FrozenBatchNormAct2d": "FrozenBatchNorm",  # timm.layers
}


def kind_name(name: str) -> str:
    """A layer kind from a kind or a torch.nn class name ('Conv2d' -> 'Conv')."""
    if name in LAYERS:
        return name
    if name in TORCH_MODULES:
        return TORCH_MODULES[name]
    known = sorted({*LAYERS, *TORCH_MODULES})
    raise ValueError(f"unknown layer kind {name!r}; use one of {', '.join(known)}")


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A C-contiguous copy of a torch-layout array in Flax's layout."""
    return np.transpose(array, LAYOUTS[layout][0](array.ndim)).copy()


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A C-contiguous copy of a Flax-layout array in torch's layout."""
    return np.transpose(array, LAYOUTS[layout][1](array.ndim)).copy()
