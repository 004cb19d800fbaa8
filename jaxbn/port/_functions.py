"""PyTorch functions and tensor methods in JAX, with torch's signatures and semantics.

Each function takes the arguments torch's does, under the same names, so a
traced call's ``args``/``kwargs`` apply unchanged. Activations are (N, C,
...) as in torch; pooling works on the trailing spatial axes. Depends on jax
only.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    return value * d if len(value) == 1 else value


def _shape_args(shape: tuple[Any, ...]) -> tuple[int, ...]:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _dims(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (tuple, list)) else dim


# --- activations -----------------------------------------------------------


def relu(input: Array, inplace: bool = False) -> Array:
    return jnp.maximum(input, 0)


def relu6(input: Array, inplace: bool = False) -> Array:
    return jnp.minimum(jnp.maximum(input, 0), 6)


def hardtanh(
    input: Array, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> Array:
    return jnp.minimum(jnp.maximum(input, min_val), max_val)


def sigmoid(input: Array) -> Array:
    return jax.nn.sigmoid(input)


def silu(input: Array, inplace: bool = False) -> Array:
    return input * jax.nn.sigmoid(input)


def tanh(input: Array) -> Array:
    return jnp.tanh(input)


def hardsigmoid(input: Array, inplace: bool = False) -> Array:
    return jnp.minimum(jnp.maximum(input + 3, 0), 6) / 6


def hardswish(input: Array, inplace: bool = False) -> Array:
    return input * jnp.minimum(jnp.maximum(input + 3, 0), 6) / 6


def gelu(input: Array, approximate: str = "none") -> Array:
    return jax.nn.gelu(input, approximate=approximate == "tanh")


def leaky_relu(input: Array, negative_slope: float = 0.01, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, input * negative_slope)


def elu(input: Array, alpha: float = 1.0, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, alpha * jnp.expm1(input))


def softplus(input: Array, beta: float = 1.0, threshold: float = 20.0) -> Array:
    scaled = input * beta
    return jnp.where(scaled > threshold, input, jnp.log1p(jnp.exp(scaled)) / beta)


def mish(input: Array, inplace: bool = False) -> Array:
    return input * jnp.tanh(softplus(input))


def softmax(input: Array, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Array:
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.softmax(x, axis=-1 if dim is None else dim)


def log_softmax(
    input: Array, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None
) -> Array:
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.log_softmax(x, axis=-1 if dim is None else dim)


# --- train-time randomness (keywords train= and rng= come from the port) ---


def dropout(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``F.dropout``; ``training`` as traced is replaced by the Flax ``train`` flag."""
    del training
    return _drop(input, p, train, rng, input.shape)


def dropout2d(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``F.dropout2d``: whole channels of (N, C, H, W) input."""
    del training
    return _drop(input, p, train, rng, (*input.shape[:-2], 1, 1))


def _drop(
    input: Array, p: float, train: bool, rng: Callable[[], Array], shape: tuple[int, ...]
) -> Array:
    """Zero with probability ``p`` per element of a mask of ``shape``; scale the rest."""
    if not train or p == 0:
        return input
    if p == 1:
        return jnp.zeros_like(input)
    keep = jax.random.bernoulli(rng(), 1 - p, shape)
    return jnp.where(keep, input / (1 - p), 0).astype(input.dtype)


def stochastic_depth(
    input: Array,
    p: float,
    mode: str,
    training: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``torchvision.ops.stochastic_depth``: drop whole rows ('row') or the batch ('batch')."""
    del training
    if not train or p == 0.0:
        return input
    survival = 1.0 - p
    shape = (input.shape[0],) + (1,) * (input.ndim - 1) if mode == "row" else (1,) * input.ndim
    noise = jax.random.bernoulli(rng(), survival, shape).astype(input.dtype)
    if survival > 0.0:
        noise = noise / survival
    return input * noise


def drop_path(
    x: Array,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """timm's ``drop_path`` (per-sample stochastic depth)."""
    del training
    if drop_prob == 0.0 or not train:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    noise = jax.random.bernoulli(rng(), keep, shape).astype(x.dtype)
    if keep > 0.0 and scale_by_keep:
        noise = noise / keep
    return x * noise


# --- pooling and padding ---------------------------------------------------


def _window_geometry(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> tuple[int, int]:
    """PyTorch's output length, and the padded length the windows span."""
    span = dilation * (kernel - 1) + 1
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * pad - span) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or left padding
    return out, (out - 1) * stride + span


def _pad_to(x: Array, lows: Sequence[int], lengths: Sequence[int], value: Any) -> Array:
    """Pad (or crop) the trailing axes: ``lows[i]`` before, up to ``lengths[i]`` in all."""
    d = len(lows)
    widths = [(0, 0)] * (x.ndim - d)
    for axis, (low, length) in enumerate(zip(lows, lengths, strict=True)):
        size = x.shape[x.ndim - d + axis]
        widths.append((low, max(0, length - low - size)))
    x = jnp.pad(x, widths, constant_values=value)
    index = (Ellipsis, *(slice(0, n) for n in lengths))
    return x[index]


def max_pool(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    d: int = 2,
) -> Array:
    """``F.max_pool{1,2,3}d``: -inf padding, ceil mode, dilation."""
    if return_indices:
        raise NotImplementedError("max pooling with return_indices=True is not supported")
    k = _tuple(kernel_size, d)
    s = _tuple(stride if stride not in (None, []) else kernel_size, d)
    p, dil = _tuple(padding, d), _tuple(dilation, d)
    size = input.shape[-d:]
    geometry = [_window_geometry(*g, ceil_mode) for g in zip(size, k, s, p, dil, strict=True)]
    floating = jnp.issubdtype(input.dtype, jnp.floating)
    lowest = -float("inf") if floating else int(jnp.iinfo(input.dtype).min)
    x = _pad_to(input, p, [length for _, length in geometry], lowest)
    return lax.reduce_window(
        x,
        lowest,  # a Python scalar, so that JAX sees a max-pool it can differentiate
        lax.max,
        (1,) * (x.ndim - d) + k,
        (1,) * (x.ndim - d) + s,
        "VALID",
        window_dilation=(1,) * (x.ndim - d) + dil,
    )


def _window_counts(
    size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool
) -> np.ndarray:
    """How many elements each output of average pooling divides by, on one axis."""
    counts = []
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, size + pad)
        if not include_pad:
            start, end = max(start, 0), min(end, size)
        counts.append(end - start)
    return np.asarray(counts, np.float64)


def avg_pool(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    d: int = 2,
) -> Array:
    """``F.avg_pool{1,2,3}d`` with PyTorch's divisor (padding, ceil mode, override)."""
    k = _tuple(kernel_size, d)
    s = _tuple(stride if stride not in (None, []) else kernel_size, d)
    p = _tuple(padding, d)
    size = input.shape[-d:]
    geometry = [_window_geometry(*g, 1, ceil_mode) for g in zip(size, k, s, p, strict=True)]
    x = _pad_to(input, p, [length for _, length in geometry], 0)
    total = lax.reduce_window(
        x, 0.0 if jnp.issubdtype(input.dtype, jnp.floating) else 0, lax.add, (1,) * (x.ndim - d) + k,
        (1,) * (x.ndim - d) + s, "VALID",
    )  # fmt: skip
    if divisor_override:
        return total / jnp.asarray(divisor_override, input.dtype)
    count = np.ones((), np.float64)
    for axis in range(d):
        c = _window_counts(size[axis], k[axis], s[axis], p[axis], geometry[axis][0],
                           count_include_pad)  # fmt: skip
        count = np.multiply.outer(count, c)
    return total / jnp.asarray(count, input.dtype)


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(input: Array, output_size: Any, *, d: int = 2) -> Array:
    """``F.adaptive_avg_pool{1,2,3}d``: PyTorch's windows [floor(i*L/n), ceil((i+1)*L/n))."""
    sizes = _tuple(output_size, d)
    x = input
    for axis, out in enumerate(sizes):
        ax = input.ndim - d + axis
        length = x.shape[ax]
        out = length if out is None else out
        if length % out == 0:
            shape = (*x.shape[:ax], out, length // out, *x.shape[ax + 1 :])
            x = x.reshape(shape).mean(axis=ax + 1)
        else:
            x = jnp.stack([
                lax.slice_in_dim(x, lo, hi, axis=ax).mean(axis=ax)
                for lo, hi in _adaptive_windows(length, out)
            ], axis=ax)  # fmt: skip
    return x


def adaptive_max_pool(
    input: Array, output_size: Any, return_indices: bool = False, *, d: int = 2
) -> Array:
    """``F.adaptive_max_pool{1,2,3}d``."""
    if return_indices:
        raise NotImplementedError("adaptive max pooling with return_indices=True")
    sizes = _tuple(output_size, d)
    x = input
    for axis, out in enumerate(sizes):
        ax = input.ndim - d + axis
        length = x.shape[ax]
        out = length if out is None else out
        x = jnp.stack([
            lax.slice_in_dim(x, lo, hi, axis=ax).max(axis=ax)
            for lo, hi in _adaptive_windows(length, out)
        ], axis=ax)  # fmt: skip
    return x


def pad(
    input: Array, pad: Sequence[int], mode: str = "constant", value: float | None = None
) -> Array:
    """``F.pad``: ``pad`` pairs from the last axis backwards; negative pads crop."""
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    grow = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
    kwargs = {"constant_values": 0 if value is None else value} if mode == "constant" else {}
    x = jnp.pad(input, grow, mode=modes[mode], **kwargs)  # type: ignore[arg-type]
    crop = tuple(slice(-min(lo, 0), x.shape[i] + min(hi, 0)) for i, (lo, hi) in enumerate(widths))
    return x[crop]


# --- tensors ---------------------------------------------------------------


def flatten(input: Array, start_dim: int = 0, end_dim: int = -1) -> Array:
    if input.ndim == 0:
        return input.reshape(1)
    start, end = start_dim % input.ndim, end_dim % input.ndim
    return input.reshape(*input.shape[:start], -1, *input.shape[end + 1 :])


def cat(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.concatenate(list(tensors), axis=dim)


def stack(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.stack(list(tensors), axis=dim)


def transpose(input: Array, dim0: int, dim1: int) -> Array:
    return jnp.swapaxes(input, dim0, dim1)


def permute(input: Array, *dims: Any) -> Array:
    return jnp.transpose(input, _shape_args(dims))


def reshape(input: Array, *shape: Any) -> Array:
    return jnp.reshape(input, _shape_args(shape))


def chunk(input: Array, chunks: int, dim: int = 0) -> tuple[Array, ...]:
    """``torch.chunk``: pieces of ceil(n / chunks); the last may be smaller, or fewer pieces."""
    size = -(-input.shape[dim] // chunks)
    return split(input, size, dim)


def split(input: Array, split_size_or_sections: Any, dim: int = 0) -> tuple[Array, ...]:
    n = input.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]
    else:
        edges = np.cumsum([0, *split_size_or_sections])
        bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    return tuple(lax.slice_in_dim(input, lo, hi, axis=dim) for lo, hi in bounds)


def mean(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.mean(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


def sum_(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.sum(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


def amax(input: Array, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.max(input, axis=_dims(dim) if dim != () else None, keepdims=keepdim)


def squeeze(input: Array, dim: Any = None) -> Array:
    if dim is None:
        return jnp.squeeze(input)
    dims = tuple(d % input.ndim for d in (_dims(dim) if isinstance(dim, (tuple, list)) else (dim,)))
    # torch ignores dimensions that are not of size 1.
    return jnp.squeeze(input, tuple(d for d in dims if input.shape[d] == 1))


def unsqueeze(input: Array, dim: int) -> Array:
    return jnp.expand_dims(input, dim % (input.ndim + 1))


def size(input: Array, dim: int | None = None) -> Any:
    return tuple(input.shape) if dim is None else input.shape[dim]


def expand(input: Array, *sizes: Any) -> Array:
    shape = _shape_args(sizes)
    lead = len(shape) - input.ndim
    full = tuple((input.shape[i - lead] if s == -1 else s) for i, s in enumerate(shape))
    return jnp.broadcast_to(input, full)


def expand_as(input: Array, other: Array) -> Array:
    return jnp.broadcast_to(input, other.shape)


def view_as(input: Array, other: Array) -> Array:
    return jnp.reshape(input, other.shape)


def identity(input: Any, *args: Any, **kwargs: Any) -> Any:
    return input


def clamp(input: Array, min: Any = None, max: Any = None) -> Array:
    return jnp.clip(input, min, max)


def linear(input: Array, weight: Array, bias: Array | None = None) -> Array:
    y = input @ weight.T
    return y if bias is None else y + bias


def div(input: Any, other: Any, *, rounding_mode: str | None = None) -> Any:
    if rounding_mode == "floor":
        return jnp.floor_divide(input, other)
    if rounding_mode == "trunc":
        return jnp.trunc(jnp.true_divide(input, other))
    return operator.truediv(input, other)


def add(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input + (other if alpha == 1 else other * alpha)


def sub(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input - (other if alpha == 1 else other * alpha)


def getattr_(obj: Any, name: str) -> Any:
    """``x.shape`` and friends, on an array."""
    if name == "shape":
        return tuple(obj.shape)
    if name in ("ndim", "dtype", "T"):
        return getattr(obj, name)
    raise NotImplementedError(f"tensor attribute {name!r}")
