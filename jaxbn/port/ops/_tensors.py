"""Tensor ops: shapes and views, joining and splitting, reductions, elementwise maths,
sliding windows (fold/unfold), casts.

Each takes torch's arguments under torch's names (a method's tensor is the
first); shapes are static in JAX, so ``size()`` and friends return Python
ints and the shape arithmetic of a forward is plain Python.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._activations import _clamped
from ._registry import FromModule, attributes, register

Array = jax.Array

# torch.max(x, dim) and friends return (values, indices) with names.
MinMax = collections.namedtuple("MinMax", ["values", "indices"])


def _shape_args(shape: tuple[Any, ...]) -> tuple[int, ...]:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _dims(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (tuple, list)) else dim


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


# --- identity, views and shapes -------------------------------------------------


@register("Tensor.contiguous", modules={"torch.nn.Identity": attributes()})
def identity(input: Any, *args: Any, **kwargs: Any) -> Any:
    """``nn.Identity``, ``contiguous()``: the input itself (in torch, the same memory)."""
    return input


@register("torch.clone", "Tensor.clone")
def clone(input: Array, *, memory_format: Any = None) -> Array:
    """A copy (JAX arrays are values: the input itself)."""
    return input


@register("torch.detach", "Tensor.detach", "Tensor.detach_")
def detach(input: Array) -> Array:
    """The same values, with no gradient flowing back."""
    return lax.stop_gradient(input)


@register(
    "torch.flatten",
    "Tensor.flatten",
    modules={"torch.nn.Flatten": attributes("start_dim", "end_dim")},
)
def flatten(input: Array, start_dim: int = 0, end_dim: int = -1) -> Array:
    if input.ndim == 0:
        return input.reshape(1)
    start, end = start_dim % input.ndim, end_dim % input.ndim
    return input.reshape(*input.shape[:start], -1, *input.shape[end + 1 :])


@register(
    "torch.unflatten",
    "Tensor.unflatten",
    modules={
        "torch.nn.Unflatten": FromModule(lambda m: {"dim": m.dim, "sizes": m.unflattened_size})
    },
)
def unflatten(input: Array, dim: int, sizes: Sequence[int]) -> Array:
    dim = dim % input.ndim
    return input.reshape(*input.shape[:dim], *sizes, *input.shape[dim + 1 :])


@register("torch.reshape", "Tensor.reshape", "Tensor.view")
def reshape(input: Array, *shape: Any) -> Array:
    return jnp.reshape(input, _shape_args(shape))


@register("Tensor.reshape_as", "Tensor.view_as")
def reshape_as(input: Array, other: Array) -> Array:
    return jnp.reshape(input, other.shape)


@register("torch.transpose", "Tensor.transpose", "torch.swapaxes", "Tensor.swapaxes")
def transpose(input: Array, dim0: int, dim1: int) -> Array:
    return jnp.swapaxes(input, dim0, dim1)


@register("torch.permute", "Tensor.permute")
def permute(input: Array, *dims: Any) -> Array:
    return jnp.transpose(input, _shape_args(dims))


@register("torch.squeeze", "Tensor.squeeze")
def squeeze(input: Array, dim: Any = None) -> Array:
    if dim is None:
        return jnp.squeeze(input)
    dims = tuple(d % input.ndim for d in (_dims(dim) if isinstance(dim, (tuple, list)) else (dim,)))
    # torch ignores dimensions that are not of size 1.
    return jnp.squeeze(input, tuple(d for d in dims if input.shape[d] == 1))


@register("torch.unsqueeze", "Tensor.unsqueeze")
def unsqueeze(input: Array, dim: int) -> Array:
    return jnp.expand_dims(input, dim % (input.ndim + 1))


@register("Tensor.expand")
def expand(input: Array, *sizes: Any) -> Array:
    shape = _shape_args(sizes)
    lead = len(shape) - input.ndim
    full = tuple((input.shape[i - lead] if s == -1 else s) for i, s in enumerate(shape))
    return jnp.broadcast_to(input, full)


@register("Tensor.expand_as")
def expand_as(input: Array, other: Array) -> Array:
    return jnp.broadcast_to(input, other.shape)


@register("Tensor.size")
def size(input: Array, dim: int | None = None) -> Any:
    return tuple(input.shape) if dim is None else input.shape[dim]


@register("Tensor.dim", "Tensor.ndimension")
def dim(input: Array) -> int:
    return input.ndim


@register("torch.numel", "Tensor.numel")
def numel(input: Array) -> int:
    return int(np.prod(input.shape))


@register("Tensor.repeat", "torch.tile", "Tensor.tile")
def repeat(input: Array, *sizes: Any) -> Array:
    """Tile ``input`` ``sizes`` times per axis (more sizes than axes add leading axes;
    fewer, as only ``tile`` takes, repeat the last axes)."""
    return jnp.tile(input, _shape_args(sizes))


@register("torch.repeat_interleave", "Tensor.repeat_interleave")
def repeat_interleave(
    input: Array, repeats: Any, dim: int | None = None, *, output_size: int | None = None
) -> Array:
    """Each element ``repeats`` times in a row along ``dim`` (flattened when None);
    ``repeats`` an int or one count per element. (torch's one-argument form, which
    repeats indices, has a size that depends on the values: it is not supported.)"""
    return jnp.repeat(input, repeats, axis=dim, total_repeat_length=output_size)


@register("torch.arange")
def arange(start: Any, end: Any = None, step: Any = 1, *, dtype: Any = None, **_: Any) -> Array:
    """Integers (JAX's int: int32 unless x64 is on) when every bound is one, else
    float32, as torch's default; a device and the like are ignored."""
    if end is None:
        start, end = 0, start
    if dtype is None and not all(isinstance(v, int) for v in (start, end, step)):
        dtype = jnp.float32
    return jnp.arange(start, end, step, dtype=dtype)


def _new(fill: float, size: tuple[Any, ...], dtype: Any) -> Array:
    return jnp.full(_shape_args(size), fill, jnp.float32 if dtype is None else dtype)


@register("torch.zeros")
def zeros(*size: Any, dtype: Any = None, **_: Any) -> Array:
    """float32 unless ``dtype``; a device and the like are ignored."""
    return _new(0.0, size, dtype)


@register("torch.ones")
def ones(*size: Any, dtype: Any = None, **_: Any) -> Array:
    """float32 unless ``dtype``; a device and the like are ignored."""
    return _new(1.0, size, dtype)


@register("torch.zeros_like", "Tensor.zero_")
def zeros_like(input: Array, *, dtype: Any = None, **_: Any) -> Array:
    return jnp.zeros_like(input, dtype=dtype)


@register("torch.ones_like")
def ones_like(input: Array, *, dtype: Any = None, **_: Any) -> Array:
    return jnp.ones_like(input, dtype=dtype)


@register("torch.tensor", "torch.as_tensor")
def tensor(data: Any, dtype: Any = None, device: Any = None, **_: Any) -> Array:
    """Python numbers (a size) as a tensor: torch's dtypes (bool; ints as JAX's int;
    floats float32), or ``dtype``; an array keeps its own."""
    if dtype is None and not hasattr(data, "dtype"):
        leaves = jax.tree.leaves(data)
        if not all(isinstance(v, int) for v in leaves):  # (bools are ints)
            dtype = jnp.float32
    return jnp.asarray(data, dtype)


@register(
    "torch.meshgrid", "torch._VF.meshgrid"
)  # (torch.meshgrid([a, b]) calls _VF with the list)
def meshgrid(*tensors: Any, indexing: str | None = None) -> tuple[Array, ...]:
    """torch's default is 'ij' (matrix) indexing."""
    arrays = tensors[0] if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)) else tensors
    return tuple(jnp.meshgrid(*arrays, indexing=indexing or "ij"))


@register("torch.roll", "Tensor.roll")
def roll(input: Array, shifts: Any, dims: Any = None) -> Array:
    """Shift cyclically along ``dims`` (the flattened tensor when None)."""
    return jnp.roll(input, _dims(shifts), axis=_dims(dims))


@register("Tensor.new_zeros")
def new_zeros(input: Array, *size: Any, dtype: Any = None, **_: Any) -> Array:
    """Zeros of ``size`` in ``input``'s dtype unless ``dtype``."""
    return jnp.zeros(_shape_args(size), input.dtype if dtype is None else dtype)


@register("Tensor.new_ones")
def new_ones(input: Array, *size: Any, dtype: Any = None, **_: Any) -> Array:
    return jnp.ones(_shape_args(size), input.dtype if dtype is None else dtype)


@register("torch.masked_fill", "Tensor.masked_fill", "Tensor.masked_fill_")
def masked_fill(input: Array, mask: Array, value: Any) -> Array:
    """``value`` where ``mask`` is True (broadcast), in ``input``'s dtype; no gradient
    flows to ``input`` there."""
    return jnp.where(mask, jnp.asarray(value, input.dtype), input)


# --- joining and splitting ---------------------------------------------------


@register("torch.cat", "torch.concat", "torch.concatenate")
def cat(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.concatenate(list(tensors), axis=dim)


@register("torch.stack")
def stack(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.stack(list(tensors), axis=dim)


@register("torch.split", "Tensor.split")
def split(input: Array, split_size_or_sections: Any, dim: int = 0) -> tuple[Array, ...]:
    n = input.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]
    else:
        edges = np.cumsum([0, *split_size_or_sections])
        bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    return tuple(lax.slice_in_dim(input, lo, hi, axis=dim) for lo, hi in bounds)


@register("torch.chunk", "Tensor.chunk")
def chunk(input: Array, chunks: int, dim: int = 0) -> tuple[Array, ...]:
    """Pieces of ceil(n / chunks); the last may be smaller, or there may be fewer pieces."""
    return split(input, -(-input.shape[dim] // chunks), dim)


@register("torch.unbind", "Tensor.unbind")
def unbind(input: Array, dim: int = 0) -> tuple[Array, ...]:
    return tuple(jnp.moveaxis(input, dim, 0))


# --- reductions ----------------------------------------------------------------


@register("torch.mean", "Tensor.mean")
def mean(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.mean(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


@register("torch.sum", "Tensor.sum", name="sum")
def sum_of(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.sum(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


@register("torch.amax", "Tensor.amax")
def amax(input: Array, dim: Any = (), keepdim: bool = False) -> Array:
    """The gradient of tied maxima is shared evenly, as torch's."""
    return jnp.max(input, axis=_dims(dim) if dim != () else None, keepdims=keepdim)


@register("torch.amin", "Tensor.amin")
def amin(input: Array, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.min(input, axis=_dims(dim) if dim != () else None, keepdims=keepdim)


def _extreme(input: Array, dim: Any, keepdim: bool, other: Any, largest: bool) -> Any:
    if other is not None or not isinstance(dim, (int, type(None))):  # max(input, other)
        other = dim if other is None else other
        return jnp.maximum(input, other) if largest else jnp.minimum(input, other)
    if dim is None:  # the whole tensor: tied maxima share the gradient, as in torch
        return jnp.max(input) if largest else jnp.min(input)
    index = (jnp.argmax if largest else jnp.argmin)(input, axis=dim, keepdims=True)
    values = jnp.take_along_axis(input, index, axis=dim)  # the gradient to the first one
    if not keepdim:
        values, index = jnp.squeeze(values, dim), jnp.squeeze(index, dim)
    return MinMax(values, index)


@register("torch.max", "Tensor.max", name="max")
def max_of(input: Array, dim: Any = None, keepdim: bool = False, *, other: Any = None) -> Any:
    """``max(x)``, ``max(x, dim)`` -> (values, indices) of the first maximum, ``max(x, y)``."""
    return _extreme(input, dim, keepdim, other, largest=True)


@register("torch.min", "Tensor.min", name="min")
def min_of(input: Array, dim: Any = None, keepdim: bool = False, *, other: Any = None) -> Any:
    """``min(x)``, ``min(x, dim)`` -> (values, indices) of the first minimum, ``min(x, y)``."""
    return _extreme(input, dim, keepdim, other, largest=False)


def vector_norm(input: Array, p: Any, axis: Any, keepdims: bool) -> Array:
    """``||input||_p`` over ``axis`` (None: all), with torch's gradient at a zero vector: 0."""
    magnitude = input * jnp.sign(input)  # (|x| with torch's gradient at 0: 0)
    if math.isinf(p):
        reduce = jnp.max if p > 0 else jnp.min
        return reduce(magnitude, axis=axis, keepdims=keepdims)
    total = jnp.sum(magnitude**p, axis=axis, keepdims=keepdims)
    positive = total > 0
    # (the double where keeps the gradient finite at 0, where torch's is 0)
    return jnp.where(positive, jnp.where(positive, total, 1) ** (1 / p), 0)


@register("torch.norm", "Tensor.norm", "torch.linalg.vector_norm")
def norm(
    input: Array,
    p: Any = "fro",
    dim: Any = None,
    keepdim: bool = False,
    *,
    dtype: Any = None,
    **kwargs: Any,
) -> Array:
    """``torch.norm`` and ``Tensor.norm`` (``p``: a number, inf, or 'fro', the 2-norm of
    the elements), and ``torch.linalg.vector_norm`` (its ``ord``)."""
    p = kwargs.pop("ord", p)
    x = input if dtype is None else input.astype(dtype)
    return vector_norm(x, 2.0 if p in ("fro", None) else float(p), _dims(dim), keepdim)


@register("torch.var", "Tensor.var")
def var(
    input: Array,
    dim: Any = None,
    unbiased: Any = None,
    keepdim: bool = False,
    *,
    correction: Any = None,
) -> Array:
    """``var(x, dim, unbiased, keepdim)`` or ``var(x, dim, correction=, keepdim=)``;
    torch's ``correction`` (or 1, or 0 with ``unbiased=False``) degrees lost."""
    if isinstance(dim, bool):  # var(x, unbiased)
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    return jnp.var(input, axis=_dims(dim), ddof=correction, keepdims=keepdim)


@register("torch.std", "Tensor.std")
def std(
    input: Array,
    dim: Any = None,
    unbiased: Any = None,
    keepdim: bool = False,
    *,
    correction: Any = None,
) -> Array:
    return jnp.sqrt(var(input, dim, unbiased, keepdim, correction=correction))


@register("torch.cumsum", "Tensor.cumsum")
def cumsum(input: Array, dim: int, *, dtype: Any = None) -> Array:
    return jnp.cumsum(input, axis=dim, dtype=dtype)


# --- elementwise -------------------------------------------------------------


@register("torch.addcmul", "Tensor.addcmul", "Tensor.addcmul_")
def addcmul(input: Array, tensor1: Array, tensor2: Array, *, value: Any = 1) -> Array:
    """``input + value * tensor1 * tensor2``."""
    return input + value * tensor1 * tensor2


@register("torch.sqrt", "Tensor.sqrt", "math.sqrt")
def sqrt(input: Any) -> Any:
    """A float for a number (``math.sqrt``), elementwise for a tensor."""
    if isinstance(input, (int, float)):
        return math.sqrt(input)
    return jnp.sqrt(input)


@register("torch.rsqrt", "Tensor.rsqrt")
def rsqrt(input: Array) -> Array:
    return 1 / jnp.sqrt(input)


@register("torch.exp", "Tensor.exp")
def exp(input: Array) -> Array:
    return jnp.exp(input)


@register("torch.sin", "Tensor.sin")
def sin(input: Array) -> Array:
    return jnp.sin(input)


@register("torch.cos", "Tensor.cos")
def cos(input: Array) -> Array:
    return jnp.cos(input)


@register("torch.log", "Tensor.log")
def log(input: Array) -> Array:
    return jnp.log(input)


@register("torch.abs", "Tensor.abs", name="abs")
def abs_of(input: Array) -> Array:
    """``|x|``, whose gradient at 0 is 0 as torch's (``jnp.abs`` passes 1)."""
    return input * jnp.sign(input)


@register(
    "torch.clamp",
    "torch.clip",
    "Tensor.clamp",
    "Tensor.clamp_",
    "Tensor.clip",
)
def clamp(input: Array, min: Any = None, max: Any = None) -> Array:
    """Number bounds pass no gradient at a bound (torch's); tensor bounds pass half."""
    if all(bound is None or isinstance(bound, (int, float)) for bound in (min, max)):
        return _clamped(input, min, max)
    return jnp.clip(input, min, max)


@register("torch.clamp_min", "Tensor.clamp_min", "Tensor.clamp_min_")
def clamp_min(input: Array, min: Any) -> Array:
    return clamp(input, min, None)


@register("torch.clamp_max", "Tensor.clamp_max", "Tensor.clamp_max_")
def clamp_max(input: Array, max: Any) -> Array:
    return clamp(input, None, max)


# --- casts ------------------------------------------------------------------------


@register("Tensor.to")
def to(input: Array, *args: Any, **kwargs: Any) -> Array:
    """``x.to(dtype)``, ``x.to(other)``; a device is ignored (JAX places arrays itself)."""
    dtype = kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, jnp.dtype):
            dtype = arg
        elif hasattr(arg, "dtype") and hasattr(arg, "shape"):
            dtype = arg.dtype
    return input if dtype is None else input.astype(dtype)


@register("Tensor.type_as")
def type_as(input: Array, other: Array) -> Array:
    return input.astype(other.dtype)


@register("Tensor.float", name="float")
def to_float(input: Array) -> Array:
    return input.astype(jnp.float32)


@register("Tensor.long", "Tensor.int", name="long")
def to_int(input: Array) -> Array:
    """Toward zero, as torch casts; int64 is JAX's int (int32 unless x64 is on)."""
    return input.astype(jax.dtypes.canonicalize_dtype(jnp.int64))


# --- sliding windows --------------------------------------------------------------


@register("torch.nn.functional.unfold", modules={
    "torch.nn.Unfold": attributes("kernel_size", "dilation", "padding", "stride")
})  # fmt: skip
def unfold(
    input: Array, kernel_size: Any, dilation: Any = 1, padding: Any = 0, stride: Any = 1
) -> Array:
    """im2col: (N, C, H, W) -> (N, C * kh * kw, L), blocks in row-major order."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel_size, dilation, padding, stride))
    n, c = input.shape[:2]
    x = jnp.pad(input, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    patches = [
        x[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
        for i, j in itertools.product(range(kh), range(kw))
    ]
    return jnp.stack(patches, axis=2).reshape(n, c * kh * kw, oh * ow)


@register("torch.nn.functional.fold", modules={
    "torch.nn.Fold": attributes("output_size", "kernel_size", "dilation", "padding", "stride")
})  # fmt: skip
def fold(
    input: Array,
    output_size: Any,
    kernel_size: Any,
    dilation: Any = 1,
    padding: Any = 0,
    stride: Any = 1,
) -> Array:
    """col2im, the sum of overlapping blocks: (N, C * kh * kw, L) -> (N, C, H, W)."""
    (h, w), (kh, kw) = _pair(output_size), _pair(kernel_size)
    (dh, dw), (ph, pw), (sh, sw) = map(_pair, (dilation, padding, stride))
    n = input.shape[0]
    c = input.shape[1] // (kh * kw)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    blocks = input.reshape(n, c, kh, kw, oh, ow)
    out = jnp.zeros((n, c, h + 2 * ph, w + 2 * pw), input.dtype)
    for i, j in itertools.product(range(kh), range(kw)):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
        out = out.at[:, :, rows, cols].add(blocks[:, :, i, j])
    return out[:, :, ph : ph + h, pw : pw + w]


@register("Tensor.unfold")
def unfold_dim(input: Array, dimension: int, size: int, step: int) -> Array:
    """``x.unfold(dim, size, step)``: windows of ``dim`` as a new last axis."""
    dimension = dimension % input.ndim
    count = (input.shape[dimension] - size) // step + 1
    windows = [
        lax.slice_in_dim(input, i * step, i * step + size, axis=dimension) for i in range(count)
    ]
    stacked = jnp.stack(windows, axis=dimension)  # (..., count, size, ...)
    return jnp.moveaxis(stacked, dimension + 1, -1)
