"""PyTorch <-> Flax names and layouts: one declarative spec per layer kind.

Reading a row: the torch tensor ``<module>.<torch>`` becomes the Flax
variable ``<collection>/<module path>/<flax>``, rearranged by ``layout``
(a pure axis permutation, so conversion is bit-exact both ways) and typed by
``dtype`` ('keep', or 'count' for the step counter). ``'*'`` names any
tensor, kept under its own name. Adding a layer kind is adding a spec.

>>> [(t.torch, t.collection, t.flax, t.layout) for t in KINDS["Linear"].tensors]
[('weight', 'params', 'kernel', 'transposed'), ('bias', 'params', 'bias', 'same')]
>>> kind_of_class("BatchNorm2d"), kind_name("Conv2d")
('BatchNorm', 'Conv')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

ANY = "*"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a layer kind: its PyTorch name, Flax place, layout and dtype rule."""

    torch: str  # name in the torch module, or ANY
    collection: str  # Flax collection: 'params', 'batch_stats', 'buffers'
    flax: str  # Flax variable name, or ANY for the torch name
    layout: str = "same"  # a key of LAYOUTS
    dtype: str = "keep"  # 'keep', or 'count': the step counter (jaxbn's count dtype)
    ranks: tuple[int, ...] = ()  # ranks a bare state dict may show; () is any
    absent: int | None = None  # loaded when a checkpoint lacks it; None: it is required
    source: str = "any"  # 'parameter' or 'buffer' of a live module, or 'any'

    def matches_torch(self, name: str, rank: int, source: str = "any") -> bool:
        """Whether this row takes the torch tensor ``name`` (``source``: see the field)."""
        if self.torch not in (ANY, name) or (self.ranks and rank not in self.ranks):
            return False
        # A state dict does not say what is a buffer: read its tensors as parameters.
        return self.source in ("any", "parameter" if source == "any" else source)

    def matches_flax(self, collection: str, name: str) -> bool:
        return self.collection == collection and self.flax in (ANY, name)

    def flax_name(self, torch_name: str) -> str:
        return torch_name if self.flax == ANY else self.flax

    def torch_name(self, flax_name: str) -> str:
        return flax_name if self.torch == ANY else self.torch


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer kind: its tensors, the torch classes that have it, and its settings.

    ``settings`` are constructor arguments that a state dict does not carry
    (``eps``, ``stride``, ...): read from a live module and reported where
    they differ from the class's default. ``inferred``: a bare state dict may
    be read as this kind from its tensor names and ranks alone.
    """

    kind: str
    tensors: tuple[Tensor, ...]
    torch_classes: tuple[str, ...]
    settings: tuple[str, ...] = ()
    inferred: bool = True

    def tensor_for_torch(self, name: str, rank: int, source: str = "any") -> Tensor | None:
        return next((t for t in self.tensors if t.matches_torch(name, rank, source)), None)

    def tensor_for_flax(self, collection: str, name: str) -> Tensor | None:
        return next((t for t in self.tensors if t.matches_flax(collection, name)), None)


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
}

_VECTOR = (1,)
_BIAS = Tensor("bias", "params", "bias", ranks=_VECTOR)
_CONV = ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding")

SPECS: tuple[LayerSpec, ...] = (
    LayerSpec(
        "BatchNorm",
        (
            Tensor("weight", "params", "scale", ranks=_VECTOR),
            _BIAS,
            Tensor("running_mean", "batch_stats", "mean", ranks=_VECTOR),
            Tensor("running_var", "batch_stats", "var", ranks=_VECTOR),
            Tensor(
                "num_batches_tracked",
                "batch_stats",
                "num_batches_tracked",
                dtype="count",
                ranks=(0,),
                absent=0,
            ),
        ),
        (
            *(f"{lazy}BatchNorm{d}d" for lazy in ("", "Lazy") for d in (1, 2, 3)),
            "SyncBatchNorm",
        ),
        settings=("eps", "momentum", "affine", "track_running_stats"),
    ),
    LayerSpec(
        "FrozenBatchNorm",  # torchvision.ops.FrozenBatchNorm2d: four buffers, never trained
        (
            Tensor("weight", "batch_stats", "scale", ranks=_VECTOR),
            Tensor("bias", "batch_stats", "bias", ranks=_VECTOR),
            Tensor("running_mean", "batch_stats", "mean", ranks=_VECTOR),
            Tensor("running_var", "batch_stats", "var", ranks=_VECTOR),
        ),
        ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"),  # torchvision's, timm's
        settings=("eps",),
        inferred=False,  # its tensors are an old BatchNorm checkpoint's too
    ),
    LayerSpec(
        "Linear",
        (Tensor("weight", "params", "kernel", "transposed", ranks=(2,)), _BIAS),
        ("Linear", "LazyLinear", "NonDynamicallyQuantizableLinear"),
    ),
    LayerSpec(
        "Conv",
        (Tensor("weight", "params", "kernel", "spatial-first", ranks=(3, 4, 5)), _BIAS),
        # ConvTranspose weights map to the kernel of
        # flax.linen.ConvTranspose(transpose_kernel=True), which computes what
        # torch's ConvTranspose computes, with the same permutation as Conv.
        tuple(
            f"{lazy}{conv}{d}d"
            for lazy in ("", "Lazy")
            for conv in ("Conv", "ConvTranspose")
            for d in (1, 2, 3)
        ),
        settings=_CONV,
    ),
    LayerSpec(
        "Norm",
        (Tensor("weight", "params", "scale", ranks=_VECTOR), _BIAS),
        ("LayerNorm", "GroupNorm", "RMSNorm"),
        settings=("eps", "num_groups"),
    ),
    LayerSpec(
        "Embedding",
        (Tensor("weight", "params", "embedding", ranks=(2,)),),
        ("Embedding",),
        settings=("padding_idx", "max_norm"),
    ),
    LayerSpec("PReLU", (Tensor("weight", "params", "negative_slope", ranks=_VECTOR),), ("PReLU",)),
    LayerSpec(
        "Param",  # bare parameters and buffers: layer scale, tokens, position embeddings
        (
            Tensor(ANY, "params", ANY, source="parameter"),
            Tensor(ANY, "buffers", ANY, source="buffer"),
        ),
        (),
        inferred=False,
    ),
)

KINDS: Mapping[str, LayerSpec] = {spec.kind: spec for spec in SPECS}
# torch class name -> layer kind.
TORCH_MODULES: Mapping[str, str] = {
    torch_class: spec.kind for spec in SPECS for torch_class in spec.torch_classes
}
# The classic view of the specs: kind -> its tensors.
LAYERS: Mapping[str, tuple[Tensor, ...]] = {spec.kind: spec.tensors for spec in SPECS}


def kind_of_class(name: str) -> str | None:
    """The layer kind of a torch class name, or None."""
    return TORCH_MODULES.get(name)


def kind_name(name: str) -> str:
    """A layer kind from a kind or a torch class name ('Conv2d' -> 'Conv')."""
    if name in KINDS:
        return name
    if name in TORCH_MODULES:
        return TORCH_MODULES[name]
    known = sorted({*KINDS, *TORCH_MODULES})
    raise ValueError(f"unknown layer kind {name!r}; use one of {', '.join(known)}")


def permuted(shape: tuple[int, ...], layout: str, *, to_torch: bool = False) -> tuple[int, ...]:
    """The Flax shape of a torch shape under ``layout`` (the torch shape of a Flax one)."""
    return tuple(shape[i] for i in LAYOUTS[layout][int(to_torch)](len(shape)))


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A C-contiguous copy of a torch-layout array in Flax's layout."""
    return _permuted(array, LAYOUTS[layout][0](array.ndim))


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A C-contiguous copy of a Flax-layout array in torch's layout."""
    return _permuted(array, LAYOUTS[layout][1](array.ndim))


_TILE = 256  # elements per tile side in _permuted


def _permuted(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``np.transpose(array, axes)`` as a C-contiguous copy, made tile by tile.

    One whole-array copy of a transpose reads or writes a row apart at every
    element, and on a large weight each step lands on another memory page.
    Tiles of 256x256 along the source's first and last axes keep both sides
    in cache. Measured on vgg11_bn's 4096x25088 Linear weight: 0.34-0.45 s,
    against numpy's 0.9-1.7 s (which of the two is the faster depends on
    how the memory was allocated).
    """
    if axes == tuple(range(array.ndim)):
        return array.copy()
    out = np.empty([array.shape[axis] for axis in axes], array.dtype)
    last = array.ndim - 1
    first_at, last_at = axes.index(0), axes.index(last)  # where they go in ``out``
    source = [slice(None)] * array.ndim
    target = [slice(None)] * array.ndim
    for i in range(0, array.shape[0], _TILE):
        for j in range(0, array.shape[last], _TILE):
            source[0], source[last] = slice(i, i + _TILE), slice(j, j + _TILE)
            target[first_at], target[last_at] = source[0], source[last]
            out[tuple(target)] = np.transpose(array[tuple(source)], axes)
    return out
